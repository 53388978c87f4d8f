// Loading a SentencePiece model file (T5's spiece.model, LLaMA's tokenizer.model) safely.
//
// Debian's libsentencepiece (0.1.97) trusts the model file: a piece with a NUL byte or an empty piece makes
// its trie builder throw through code that cannot unwind (abort), and a broken precompiled character map
// (the normalizer's double-array trie and its replacement strings) is read out of bounds on every encode.
// load_sentencepiece checks those parts of the protobuf first, the way later SentencePiece releases
// validate them, and fails with Error(Model) naming the file and the problem.
#pragma once
#include <string>
#include <string_view>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace blip2 {

// Throws Error(Model) if the serialized ModelProto is malformed or would make SentencePiece crash.
void check_sentencepiece_model(std::string_view proto, const std::string& path);

// Reads `path` (under the tokenizer files' size cap), checks it and loads it into `sp`; `needed_by` names
// the tokenizer in the message when the file is missing.
void load_sentencepiece(sentencepiece::SentencePieceProcessor& sp, const std::string& path, const char* needed_by);

}  // namespace blip2
