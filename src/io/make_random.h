// Random-weight checkpoints with the exact shapes of the real BLIP-2 models, for testing the engine at full
// size without downloading anything: `make_random_checkpoint` writes a directory in the Hugging Face hub
// layout (config.json, generation_config.json, tokenizer files, model.safetensors or shards + index) that
// `Blip2Model` loads like the real thing.
//
// Shapes: "xxl" (Salesforce/blip2-flan-t5-xxl), "xl" (Salesforce/blip2-flan-t5-xl), "opt-2.7b" and
// "opt-6.7b" (Salesforce/blip2-opt-*), "tiny" and "tiny-opt" (the bundled models/tiny-blip2-t5 and
// models/tiny-blip2-opt). Values are random but scaled so that activations stay O(1) through the whole
// model (see plan_random_checkpoint). The tokenizer is the bundled tiny model's of the same family (a
// stand-in: 1000 SentencePiece pieces instead of 32000, or 1024 BPE tokens instead of 50265), so captions
// are nonsense by design.
//
// Everything streams: one chunk of one tensor (4 MiB) is in memory at a time, so the 24 GB (bf16) XXL
// checkpoint is written on a machine with less memory than that.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/config.h"

namespace blip2 {

// How a tensor's values are drawn: mean + std * z, z approximately standard normal (a sum of four
// uniforms: bounded, |z| < 3.47, so nothing overflows even in F16), except elements [zero_begin,
// zero_end), which are exactly 0 (the key third of the ViT qkv bias, as in the real checkpoints).
struct RandomInit {
  float mean = 0.0f;
  float std = 0.0f;
  int64_t zero_begin = 0, zero_end = 0;
  // --outliers: the elements of the channels in `boost_channels` (sorted) are multiplied by `boost`; element
  // idx belongs to channel idx / boost_stride (a vector: stride 1; the rows of a [rows, cols] matrix: cols).
  std::vector<int64_t> boost_channels = {};
  int64_t boost_stride = 1;
  float boost = 1.0f;
  // --outliers with `compensate`: the elements of the columns in `shrink_columns` (sorted) of a [rows, cols]
  // matrix (element idx is in column idx % cols) are multiplied by `shrink`.
  std::vector<int64_t> shrink_columns = {};
  int64_t cols = 1;
  float shrink = 1.0f;
};

// `make-random --outliers`: the activation shape of real LLMs (LLM.int8(), SmoothQuant), where a few hidden
// channels are 20-100x the rest and Flan-T5's `wo` input is what breaks float16 and naive int8. Made through
// the weights, in every language-model layer: the norm weights feeding attention and the feed-forward get
// `residual_scale` in `residual_channels` channels of d_model, and the rows of the feed-forward's linear
// branch that make `ffn_channels` of its hidden channels (T5 wi_1, or wi if not gated; OPT fc1 with its
// bias; LLaMA up_proj) get `ffn_scale`, so those channels enter wo / fc2 / down_proj that much larger.
// The consuming weights are compensated (below) unless asked otherwise. The channels are drawn from the
// seed, the same in every layer (as real outlier dimensions are). ffn_scale is 50 rather than 30 because a
// gated feed-forward's hidden channels already vary about 2x around the median by themselves (tiny T5: a
// chosen channel at 17x with 30), and the point is that every chosen one enters wo at >= 20x the median.
struct OutlierOptions {
  bool enabled = false;
  // The consuming weights' columns of those channels divided by the same scale (q/k/v, T5's cross-attention
  // q and the first feed-forward products for the residual channels, with OPT's LayerNorm biases scaled like
  // their weights; wo / fc2 / down_proj for the hidden ones), so that the model computes what the clean
  // model of the same seed computes and only its activations differ, as in a trained model whose weights
  // absorb its outlier channels. Without it the ×40 channels also reach q and k at full size, which sharpens
  // attention: that model amplifies any rounding (bf16 weights: 3.7× the clean model's logits error on XL,
  // 12× on tiny OPT), so it cannot tell a quantizer that handles outliers from one that does not.
  bool compensate = true;
  int residual_channels = 4;
  float residual_scale = 40.0f;
  int ffn_channels = 3;
  float ffn_scale = 50.0f;
};

struct PlannedTensor {
  std::string name;
  Shape shape;
  RandomInit init;
};

// Everything about a random checkpoint except its bytes: no weights are made.
struct RandomCheckpointPlan {
  std::string name;          // "blip2-flan-t5-xxl", "blip2-opt-2.7b", "tiny-blip2-t5", ... (canonical_model_like)
  std::string config_json;   // config.json as written
  Blip2Config config;        // parse_config(config_json): the shapes below derive from it
  std::vector<PlannedTensor> tensors;  // model order: vision, Q-Former, projection, language model
  // --outliers (empty without it): the chosen channels, sorted, and one line per kind of tensor scaled.
  std::vector<int64_t> outlier_residual_channels, outlier_ffn_channels;
  std::vector<std::string> outlier_notes;
  int64_t total_elements() const;
};

// "xxl", "blip2-flan-t5-xxl", "Salesforce/blip2-flan-t5-xxl" (any case) -> "blip2-flan-t5-xxl"; likewise
// xl, "opt-2.7b" / "blip2-opt-2.7b" and "opt-6.7b" / "blip2-opt-6.7b"; "tiny" / "tiny-blip2-t5" ->
// "tiny-blip2-t5", "tiny-opt" / "tiny-blip2-opt" -> "tiny-blip2-opt". Throws Error(Usage) naming the choices.
std::string canonical_model_like(const std::string& like);
// "f32" / "float32" / "fp32", "bf16" / "bfloat16", "f16" / "fp16" / "float16". Throws Error(Usage).
DType parse_dtype_option(const std::string& dtype);

// Names, shapes and initialisation of every tensor the loader takes, with the config they follow from.
// `dtype` only sets config.json's "torch_dtype". Tensor names are the hub's (Appendix A of the spec): for
// T5 `language_model.shared.weight` and an untied `language_model.lm_head.weight` (the encoder/decoder
// embed_tokens aliases are not planned); for OPT no lm_head (tied to embed_tokens). Totals: XXL
// 12,229,596,672, XL 3,942,446,592, OPT-2.7b 3,744,761,856, OPT-6.7b 7,752,738,304 elements.
// With outliers.enabled the language model's tensors carry the outlier scaling (channels drawn from `seed`;
// a retrieval checkpoint has no language model and is unchanged).
RandomCheckpointPlan plan_random_checkpoint(const std::string& like, DType dtype = DType::F32,
                                            const OutlierOptions& outliers = {}, uint64_t seed = 0);

// The random stream: a tensor's values depend only on (seed, tensor name, element index), so any tensor
// can be regenerated alone, in any order or chunking. Counter-based (splitmix64 finaliser).
uint64_t random_tensor_key(uint64_t seed, const std::string& name);
void fill_random(const RandomInit& init, uint64_t key, int64_t begin, int64_t n, float* out);

struct MakeRandomProgress {
  int shard = 0, shards = 0;      // the shard being written (1-based) and how many there are
  std::string file;               // its file name
  bool shard_finished = false;    // set on the one call made after the shard is complete on disk
  size_t tensors_done = 0, tensors_total = 0;
  uint64_t bytes_done = 0, bytes_total = 0;  // tensor data bytes, all shards together
};
using MakeRandomProgressFn = std::function<void(const MakeRandomProgress&)>;

// 2 GB (decimal, as Hugging Face counts): several shards even for XL in bf16 (4) so that the sharded path
// is what gets exercised; small enough to copy, checksum or re-make one file at a time; big enough that
// XXL is a dozen files, not hundreds. Any single tensor (the largest is 526 MB) fits.
constexpr uint64_t kDefaultMaxShardBytes = 2'000'000'000;

struct MakeRandomOptions {
  DType dtype = DType::BF16;
  uint64_t seed = 0;
  // Allow a non-empty out_dir: files a checkpoint directory holds (config, tokenizer, weights, index,
  // README.txt) are replaced; anything else there is left alone. Without it a non-empty out_dir is refused.
  bool overwrite = false;
  OutlierOptions outliers;  // --outliers
  uint64_t max_shard_bytes = kDefaultMaxShardBytes;  // one file when everything fits: model.safetensors
  // Where the stand-in tokenizer is copied from (spiece.model, or vocab.json + merges.txt); empty: the
  // bundled tiny model of the same family.
  std::string tokenizer_dir;
  MakeRandomProgressFn progress;
};

// Writes the checkpoint. Throws Error(Usage) for a bad `like`, an occupied or unwritable out_dir, or too
// little free space (checked before anything is written); Error(Model) if the tokenizer source is missing.
// config.json is written last, so an interrupted run leaves a directory that does not load.
void make_random_checkpoint(const std::string& like, const std::string& out_dir, const MakeRandomOptions& options);
// The same with dtype given as text ("f32", "bf16", "f16").
void make_random_checkpoint(const std::string& like, const std::string& out_dir, const std::string& dtype,
                            uint64_t seed, const MakeRandomProgressFn& progress = nullptr);

}  // namespace blip2
