// WebDataset .tar shards: ustar headers, checksums, GNU long names and pax path records.
#include "batch/inputs.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static blip2::fuzz::MemFile file;
  file.set(data, size);
  blip2::fuzz::expect_clean([&] {
    for (const auto& item : blip2::batch::list_shard(file.path()))
      if (item.key.empty() || item.offset % 512 != 0) std::abort();
  });
  return 0;
}
