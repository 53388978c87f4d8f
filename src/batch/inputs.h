// The inputs of `blip2 caption` over a dataset: image files, directories (recursive), @LIST files, expanded
// into one ordered list of items, and the deterministic share of them that one of N processes takes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace blip2::batch {

// One image to caption. `key` names it in its output and is what resume matches on: the path as given (a
// directory's entries as DIR/relative/path), or for a member of a WebDataset shard its sample key.
struct InputItem {
  std::string key;
  std::string path;               // the file to read (for a shard's member: the .tar)
  std::string tar;                // non-empty: a member of this WebDataset shard (the same as path)
  std::string member;             // the member's name in the tar (KEY.jpg)
  uint64_t offset = 0, size = 0;  // the member's bytes in the tar
  // What --shard hashes: the image's path, or the whole .tar (one process per shard and its output).
  const std::string& share_key() const { return tar.empty() ? key : tar; }
  // For messages: the path, or TAR:MEMBER.
  std::string name() const { return tar.empty() ? path : tar + ":" + member; }
};

// Expands command-line inputs, in order, duplicates (same key) dropped:
//  * a directory: every image file below it (.png .jpg .jpeg .webp, any case), recursively, sorted by path;
//    names starting with '.' (files and directories) are skipped;
//  * @FILE: one input per line (relative paths from the current directory; blank lines and lines starting
//    with '#' skipped); a line may name a file or a directory, not another list;
//  * FILE.tar: a WebDataset shard as img2dataset writes it: samples KEY.jpg/.jpeg/.png/.webp beside KEY.json,
//    KEY.txt...; one item per sample with an image (key KEY, the member's name up to its first dot); a
//    directory's .tar files are taken too;
//  * anything else: one image file, whatever its name (decoding goes by content). A file that does not exist
//    is still an item: it fails when read, and the run records why and goes on.
// Throws Error(Input) for an unreadable list, directory or shard.
std::vector<InputItem> expand_inputs(const std::vector<std::string>& args);

// The samples of a WebDataset shard that hold an image, in the tar's order. Reads only the headers (ustar,
// GNU long names, pax path records). Throws Error(Input) for a file that is not a tar.
std::vector<InputItem> list_shard(const std::string& tar_path);
bool is_shard_name(const std::string& path);  // ends in .tar

// --shard K/N: this process takes the items whose key hashes to K modulo N (mix64(stable_hash)), so the share
// depends only on the key: the same on every run and on every machine, whatever the order of the inputs.
struct Shard {
  uint64_t index = 0, count = 1;
};
Shard parse_shard(const std::string& text);  // "K/N", 0 <= K < N; throws Error(Usage)
bool in_shard(const std::string& key, const Shard& shard);

// FNV-1a, 64-bit: a stable hash of a key (shards, per-image seeds).
uint64_t stable_hash(const std::string& s);
// SplitMix64's finalizer: spreads every input bit over the output (FNV's low bits alone are weak).
uint64_t mix64(uint64_t x);

}  // namespace blip2::batch
