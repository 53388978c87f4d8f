// Text generation over any Decoder: one loop for every decoding strategy (greedy, sampling, beam search,
// beam sampling), with Hugging Face transformers' logits processors, in its order and with its semantics.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "generate/decoder.h"
#include "ops/ops.h"

namespace blip2 {

// When beam search stops (Hugging Face's early_stopping): Heuristic (false, the default) once the finished
// set is full and the best running beam, scored at the current length, cannot beat its worst; Always (true)
// as soon as num_beams hypotheses have finished; Never ("never") only when no running beam can beat the
// worst finished one at any length still allowed (with length_penalty > 0: at max_new_tokens).
enum class EarlyStopping { Heuristic, Always, Never };

// Decoding options, with Hugging Face's names and defaults (GenerationConfig). A plain struct: fill it,
// then validate(). Options a strategy does not use are ignored by it (e.g. temperature without do_sample).
struct GenerationOptions {
  int max_new_tokens = 20;         // most tokens generated after the start token, end-of-sequence included
  int min_new_tokens = 0;          // end-of-sequence is suppressed until this many tokens are generated
  int min_length = 0;              // the same bound counted on the decoder's whole sequence, start token
                                   // included (HF min_length: for T5, min_length 1 suppresses nothing)
  int num_beams = 1;               // 1: greedy (or sampling); more: beam search (beam sampling with do_sample)
  double length_penalty = 1.0;     // beam search: a finished hypothesis scores sum_logprobs / len^length_penalty,
  EarlyStopping early_stopping = EarlyStopping::Heuristic;  // beam search: when an item is done (above)
                                   // len = generated tokens, end-of-sequence included; negative favours short
  double repetition_penalty = 1.0; // > 1 discourages every token already in the decoder's sequence
  int no_repeat_ngram_size = 0;    // > 0: no n-gram of this size occurs twice in the decoder's sequence
  int num_return_sequences = 1;    // sequences per input: the best finished beams, or independent samples
  bool do_sample = false;          // draw from the processed distribution instead of taking the best
  double temperature = 1.0;        // sampling: logits / temperature
  int top_k = 50;                  // sampling: keep the k most likely tokens (0 = off)
  double top_p = 1.0;              // sampling: keep the smallest set holding probability >= top_p (1 = off)
  std::optional<uint64_t> seed;    // sampling: same seed, same options, same model -> same output; unset: random
};

// The ids generation itself needs (T5's by default); what a row starts from comes from the Decoder.
struct SpecialTokens {
  int32_t eos = 1;  // ends a sequence
  int32_t pad = 0;  // fed to rows that have finished
};

struct GeneratedSequence {
  std::vector<int32_t> ids;  // generated ids only (no start token or prompt), up to and including the first eos
  // Beam search: the hypothesis' score as Hugging Face reports it (sequences_scores): the sum of the
  // processed log-probabilities of its tokens divided by len^length_penalty. Greedy and sampling: the sum
  // of the model's log-probabilities (log_softmax of the raw logits) of the chosen tokens.
  float score = 0.0f;
};

// Called for greedy and sampling (not beam search, whose beams change their past) after each step, once per
// unfinished row with the token it just chose, so text can stream. Rows are item-major:
// row = item * num_return_sequences + sequence.
using TokenCallback = std::function<void(int row, int32_t token)>;

// Decoder rows one batch item takes: num_beams for beam search, else num_return_sequences.
inline int rows_per_item(const GenerationOptions& o) { return o.num_beams > 1 ? o.num_beams : o.num_return_sequences; }

// The random generator of a generation: seeded with options.seed, or randomly when it is unset.
std::mt19937_64 make_rng(const GenerationOptions& options);

// One batch item's decoding, one step at a time: its rows' sequences and its strategy's state (greedy,
// sampling, beam search, beam sampling). generate() runs one per item over one decoder; the server's
// scheduler runs one per request over a decoder batch that requests join and leave between steps.
class Generation {
 public:
  // `prefixes`: each row's prefix (Decoder::prefix), rows_per_item(options) of them. `rng`: the generator
  // to draw from (not owned; shared by the items of one generate() call); null: its own, from make_rng.
  // `on_token` (greedy and sampling): called with (row within this item, token) for each chosen token.
  Generation(const GenerationOptions& options, const SpecialTokens& special, int64_t vocab,
             std::vector<std::vector<int32_t>> prefixes, std::mt19937_64* rng = nullptr,
             TokenCallback on_token = nullptr);
  Generation(Generation&&) = default;

  int rows() const { return static_cast<int>(seqs_.size()); }
  // Takes the next-token logits of this item's rows [rows, vocab] and chooses. Afterwards feed() holds the
  // tokens to feed next and parents()[r] the row that row r continues (beam search; else r). Once done(),
  // feeds padding and changes nothing.
  void advance(const float* logits);
  // Whether this step's choice needs the whole distribution: beam search, sampling, or a logits processor
  // that would change a score (repetition penalty, banned n-grams, end-of-sequence not yet allowed). When it
  // does not, advance(picks) takes the greedy picks made where the logits are (ops::greedy_pick) with the
  // same result.
  bool needs_logits() const;
  void advance(const ops::Pick* picks);
  bool done() const { return done_; }
  const std::vector<int32_t>& feed() const { return feed_; }
  const std::vector<int>& parents() const { return parents_; }
  bool reordered() const;  // parents() is not the identity
  int steps() const { return step_; }
  // num_return_sequences sequences, best first for beam search (valid once done, partial before).
  std::vector<GeneratedSequence> results() const;

 private:
  struct Hypothesis {
    std::vector<int32_t> tokens;  // the row's sequence, prefix included
    float score = 0.0f;
  };
  GenerationOptions o_;
  SpecialTokens sp_;
  int64_t V_;
  bool beam_;
  std::vector<std::vector<int32_t>> seqs_;  // per row, prefix included
  std::vector<size_t> prefix_len_;
  TokenCallback on_token_;
  std::unique_ptr<std::mt19937_64> own_rng_;
  std::mt19937_64* rng_ = nullptr;
  std::vector<int32_t> feed_;
  std::vector<int> parents_;
  bool start_step();                                  // false once done (the rows then feed padding)
  void refuse_non_finite(int64_t row, const float* values, int64_t n) const;  // Error(Model) if any is NaN/inf
  void choose(int row, int32_t next, float log_prob);  // greedy / sampling: row takes `next`
  void finish_rows();                                 // greedy / sampling: done when every row has ended
  bool last_ = false;                                 // this step is the last allowed
  std::vector<float> row_score_;    // greedy / sampling
  std::vector<bool> row_done_;
  std::vector<float> running_;      // beam search: [K] sums of processed log-probabilities
  std::vector<Hypothesis> finished_;  // beam search: best first, at most K
  int step_ = 0;
  bool done_ = false;
};

// Generates for `batch` items. `start(expand)` returns a fresh decoder over the batch with `expand` rows
// per item (beams, or independent samples). Returns num_return_sequences sequences per item, best first
// for beam search. Validates `options` first (Error(Usage)).
std::vector<std::vector<GeneratedSequence>> generate(
    const std::function<std::unique_ptr<Decoder>(int expand)>& start, int batch,
    const GenerationOptions& options, const SpecialTokens& special, const TokenCallback& on_token = nullptr);

// The smallest sampling temperature. A token d logits below the best gets weight exp(-d / temperature), which
// is exactly 0 in double precision once d / temperature > 745: below 0.002 every token 1.5 logits behind the
// best can never be drawn, sampling is greedy decoding in disguise, and beam sampling runs out of tokens.
constexpr double kMinSamplingTemperature = 0.002;

// Checks options for contradictions and ranges; throws Error(Usage) naming the command-line option.
void validate(const GenerationOptions& options);

// Generation defaults of a model directory: Hugging Face's, overridden by the fields of
// <dir>/generation_config.json that are present (max_new_tokens, or max_length counted with the start
// token; min_new_tokens, min_length, num_beams, length_penalty, repetition_penalty, no_repeat_ngram_size,
// num_return_sequences, do_sample, temperature, top_k, top_p). Throws Error(Model) for a malformed file.
GenerationOptions generation_defaults(const std::string& model_dir);

// The LAVIS settings behind the BLIP-2 paper's numbers, applied over `o`: "caption" (5 beams, at most 30
// new tokens, min_length 1) and "vqa" (5 beams, at most 10 new tokens, min_length 1, length_penalty -1;
// prompt "Question: {} Answer:"). Throws Error(Usage) for another name.
void apply_preset(GenerationOptions& o, const std::string& preset);
// The prompt a preset sends for `text` (vqa: "Question: {text} Answer:"; caption: text unchanged).
std::string preset_prompt(const std::string& preset, const std::string& text);

// ---- The pieces of one step, exposed for tests -------------------------------------------------------
// Logits processors in Hugging Face's order: repetition penalty, no-repeat n-gram, min_length, min_new_tokens.
// `scores` are raw logits (greedy, sampling) or log-probabilities (beam search); `tokens` is the row's
// sequence so far, its first `prefix_len` ids being the decoder's prefix (T5: the start token; OPT: the
// prompt), which min_length counts and min_new_tokens does not.
void process_scores(float* scores, int64_t vocab, const std::vector<int32_t>& tokens, size_t prefix_len,
                    const GenerationOptions& o, const SpecialTokens& special);
// Sampling warpers in Hugging Face's order: temperature, top_k, top_p (never fewer than min_keep tokens).
void warp_scores(float* scores, int64_t vocab, const GenerationOptions& o, int min_keep = 1);
// A draw from softmax(scores) (entries at -inf are never drawn).
int32_t sample_token(const float* scores, int64_t vocab, std::mt19937_64& rng);

}  // namespace blip2
