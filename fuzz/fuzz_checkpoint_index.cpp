// model.safetensors.index.json: the weight map, shard names and the tensors each shard must hold. The shards
// are two small real files written once; the index is the input.
#include <filesystem>

#include "core/tensor.h"
#include "fuzz_util.h"
#include "io/checkpoint.h"

namespace {

struct Dir : blip2::fuzz::DirWithInput {
  Dir() : DirWithInput("model.safetensors.index.json") {
    const blip2::Tensor a({2, 3}), b({4});
    blip2::write_safetensors(dir.path() + "/model-00001-of-00002.safetensors", {{"a", &a}});
    blip2::write_safetensors(dir.path() + "/model-00002-of-00002.safetensors", {{"b", &b}, {"c", &a}});
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Dir d;
  d.input.set(data, size);
  blip2::fuzz::expect_clean([&] {
    blip2::Checkpoint ckpt(d.dir.path());
    (void)ckpt.total_bytes();
    if (ckpt.has("a")) (void)ckpt.take("a", {2, 3});
    ckpt.check_all_used();
  });
  return 0;
}
