// Reading a whole small file (configs, tokenizer files, images) with a size cap: /dev/zero, a FIFO or a file
// that is still growing must fail with a message instead of being read without end.
#pragma once
#include <cstddef>
#include <string>

#include "core/error.h"

namespace blip2 {

// Caps, far above any real file of the kind (a BLIP-2 config.json is ~10 KB, OPT's tokenizer.json ~2 MB,
// spiece.model ~0.8 MB; an image of kMaxImagePixels compresses well below 256 MiB).
constexpr size_t kMaxConfigFileBytes = size_t(16) << 20;     // config.json and the other JSON files
constexpr size_t kMaxTokenizerFileBytes = size_t(64) << 20;  // vocab.json, merges.txt, tokenizer.json, spiece.model
constexpr size_t kMaxImageFileBytes = size_t(256) << 20;     // an image file given by path

// The bytes of `path`. Throws Error(kind) naming the path if it cannot be opened or read (a directory
// included), or once it holds more than `max_bytes` (from its size when it is a regular file, else while
// reading, so at most max_bytes + 1 bytes are ever read). `what` describes the file in messages ("config
// file", "image").
std::string read_file(const std::string& path, size_t max_bytes, ErrorKind kind, const std::string& what);

// "16 MiB", "300 bytes": a size for messages.
std::string size_str(size_t bytes);

}  // namespace blip2
