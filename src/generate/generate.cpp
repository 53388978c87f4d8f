// The generation loop. Every strategy runs the same loop: the decoder steps all rows at once, each row's
// scores go through the logits processors (and, when sampling, the warpers), and then the strategy picks:
//  * greedy / sampling: one token per unfinished row (argmax, or a draw from the softmax);
//  * beam search (Hugging Face 5.x, GenerationMixin._beam_search, early_stopping=False): per batch item,
//    the top 2·num_beams continuations over beams × vocabulary (sampled without replacement for beam
//    sampling); those among the first num_beams that end (eos, or the length limit) are offered to the
//    item's finished set with score sum_logprobs / generated_len^length_penalty, and the best num_beams
//    that do not end become the running beams. An item is done when its finished set is full and the best
//    running beam, normalised at the current length, cannot beat the worst finished one.
// Scores follow the reference's float32 arithmetic where it decides which token wins.
#include "generate/generate.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>

#include "core/error.h"
#include "core/file.h"
#include "core/tensor.h"

namespace blip2 {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kMaxNewTokens = 4096, kMaxBeams = 64, kMaxReturnSequences = 64, kMaxNgram = 4096;
// What Hugging Face adds to rule a beam out (initial beams 1.., candidates that ended).
constexpr float kRuledOut = -1.0e9f;

std::string fmt(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

[[noreturn]] void usage(const std::string& msg) { fail(ErrorKind::Usage, msg); }

// log_softmax in place, as the reference computes it: (x - max) - log(sum(exp(x - max))).
void log_softmax(float* s, int64_t V) {
  const float mx = *std::max_element(s, s + V);
  double sum = 0.0;
  for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(s[i] - mx));
  const float lse = static_cast<float>(std::log(sum));
  for (int64_t i = 0; i < V; ++i) s[i] = (s[i] - mx) - lse;
}

// Uniform in [0, 1) from 53 random bits: the same numbers on every platform for a given seed.
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// A draw from weights w (>= 0, not all zero) whose sum is `total`.
int64_t draw(const std::vector<double>& w, double total, std::mt19937_64& rng) {
  const double u = uniform01(rng) * total;
  double acc = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < static_cast<int64_t>(w.size()); ++i) {
    if (w[i] <= 0.0) continue;
    acc += w[i];
    last = i;
    if (u < acc) return i;
  }
  return last;  // rounding left u at the very top
}

// Length normalisation of a beam score at `len` generated tokens, in the reference's float32 arithmetic
// (a float32 tensor divided by a Python float).
float normalise(float score, int len, double length_penalty) {
  return score / static_cast<float>(std::pow(static_cast<double>(len), length_penalty));
}

// ---- beam search ----

struct Candidate {
  float score;  // running score + this token's processed log-probability
  int beam;
  int32_t token;
};

// The top `n` of acc (flat beams × vocab) by score, ties to the lower index, best first.
std::vector<Candidate> top_candidates(const std::vector<float>& acc, int64_t V, int n) {
  std::vector<int64_t> idx(acc.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int64_t a, int64_t b) {
    return acc[a] > acc[b] || (acc[a] == acc[b] && a < b);
  });
  std::vector<Candidate> out;
  for (int i = 0; i < n; ++i)
    out.push_back({acc[idx[i]], static_cast<int>(idx[i] / V), static_cast<int32_t>(idx[i] % V)});
  return out;
}

// `n` draws without replacement from softmax(acc), in the order drawn (beam sampling).
std::vector<Candidate> sampled_candidates(const std::vector<float>& acc, int64_t V, int n, std::mt19937_64& rng) {
  const float mx = *std::max_element(acc.begin(), acc.end());
  std::vector<double> w(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) w[i] = std::exp(static_cast<double>(acc[i] - mx));
  std::vector<Candidate> out;
  for (int i = 0; i < n; ++i) {
    const double total = std::accumulate(w.begin(), w.end(), 0.0);
    // Few tokens keep a non-zero weight after temperature, top_k and top_p: the request's settings, not a bug.
    if (!(total > 0.0))
      fail(ErrorKind::Input, "beam sampling draws " + std::to_string(n) + " tokens (2 × num_beams) but only " +
                                 std::to_string(i) + " had a non-zero probability: raise the temperature or top_p, "
                                                     "or lower num_beams");
    const int64_t j = draw(w, total, rng);
    out.push_back({acc[j], static_cast<int>(j / V), static_cast<int32_t>(j % V)});
    w[j] = 0.0;
  }
  return out;
}

std::vector<int32_t> without_prefix(const std::vector<int32_t>& seq, size_t prefix_len) {
  return {seq.begin() + static_cast<std::ptrdiff_t>(std::min(prefix_len, seq.size())), seq.end()};
}

}  // namespace

void validate(const GenerationOptions& o) {
  const auto range = [](const char* name, int v, int lo, int hi) {
    if (v < lo || v > hi)
      usage(std::string(name) + " must be between " + std::to_string(lo) + " and " + std::to_string(hi) + " (got " +
            std::to_string(v) + ")");
  };
  range("--max-new-tokens", o.max_new_tokens, 1, kMaxNewTokens);
  range("--min-new-tokens", o.min_new_tokens, 0, kMaxNewTokens);
  range("--min-length", o.min_length, 0, kMaxNewTokens + 1);
  if (o.min_new_tokens > o.max_new_tokens)
    usage("--min-new-tokens (" + std::to_string(o.min_new_tokens) + ") must not exceed --max-new-tokens (" +
          std::to_string(o.max_new_tokens) + ")");
  if (o.min_length > o.max_new_tokens + 1)
    usage("--min-length (" + std::to_string(o.min_length) + ", counting the start token) must not exceed " +
          "--max-new-tokens + 1 (" + std::to_string(o.max_new_tokens + 1) + ")");
  range("--num-beams", o.num_beams, 1, kMaxBeams);
  range("--num-return-sequences", o.num_return_sequences, 1, kMaxReturnSequences);
  range("--no-repeat-ngram-size", o.no_repeat_ngram_size, 0, kMaxNgram);
  if (o.num_beams > 1 && o.num_return_sequences > o.num_beams)
    usage("--num-return-sequences (" + std::to_string(o.num_return_sequences) + ") must not exceed --num-beams (" +
          std::to_string(o.num_beams) + "): beam search returns its best finished beams");
  if (o.num_beams == 1 && !o.do_sample && o.num_return_sequences > 1)
    usage("--num-return-sequences " + std::to_string(o.num_return_sequences) +
          " needs --num-beams (at least as many) or --do-sample: greedy decoding has one answer");
  if (!std::isfinite(o.length_penalty)) usage("--length-penalty must be a finite number (got " + fmt(o.length_penalty) + ")");
  if (!(std::isfinite(o.repetition_penalty) && o.repetition_penalty > 0.0))
    usage("--repetition-penalty must be a positive number, 1 for none (got " + fmt(o.repetition_penalty) + ")");
  if (o.do_sample) {
    if (!(std::isfinite(o.temperature) && o.temperature >= kMinSamplingTemperature))
      usage("--temperature must be at least " + fmt(kMinSamplingTemperature) + " when sampling (got " +
            fmt(o.temperature) + "; below, the softmax degenerates); for the most likely tokens leave out --do-sample");
    if (o.top_k < 0) usage("--top-k must be 0 (off) or positive (got " + std::to_string(o.top_k) + ")");
    if (!(o.top_p > 0.0 && o.top_p <= 1.0)) usage("--top-p must be in (0, 1] (got " + fmt(o.top_p) + ")");
  }
}

void process_scores(float* s, int64_t V, const std::vector<int32_t>& tokens, size_t prefix_len,
                    const GenerationOptions& o, const SpecialTokens& sp) {
  // Repetition penalty (CTRL): every distinct token of the sequence so far, prefix included, once. Hugging
  // Face's processor sees the T5 decoder's input ids (start token included) and, for OPT, the input_ids
  // Blip2ForConditionalGeneration.generate passes on (BOS, prompt and left padding). The fixtures'
  // greedy_rep1.5 sequences come out the same with or without the prefix, so they do not pin this choice.
  if (o.repetition_penalty != 1.0) {
    const float p = static_cast<float>(o.repetition_penalty);
    std::vector<int32_t> seen(tokens);
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    for (int32_t id : seen) {
      if (id < 0 || id >= V) continue;
      float& x = s[id];
      x = x < 0.0f ? x * p : x / p;
    }
  }
  // No repeated n-gram: ban every token that once followed the sequence's last n-1 tokens.
  const int n = o.no_repeat_ngram_size;
  const size_t L = tokens.size();
  if (n > 0 && L + 1 >= static_cast<size_t>(n)) {
    const size_t m = static_cast<size_t>(n) - 1;  // prefix length
    for (size_t i = 0; i + n <= L; ++i)
      if (std::equal(tokens.begin() + i, tokens.begin() + i + m, tokens.end() - m)) {
        const int32_t banned = tokens[i + m];
        if (banned >= 0 && banned < V) s[banned] = kNegInf;
      }
  }
  // Minimum lengths: end-of-sequence is impossible until then.
  if (sp.eos >= 0 && sp.eos < V) {
    if (static_cast<int64_t>(L) < o.min_length) s[sp.eos] = kNegInf;
    if (static_cast<int64_t>(L - std::min(L, prefix_len)) < o.min_new_tokens) s[sp.eos] = kNegInf;
  }
}

void warp_scores(float* s, int64_t V, const GenerationOptions& o, int min_keep) {
  if (o.temperature != 1.0) {
    const float t = static_cast<float>(o.temperature);
    for (int64_t i = 0; i < V; ++i) s[i] = s[i] / t;
  }
  if (o.top_k > 0) {
    const int64_t k = std::min<int64_t>(std::max(o.top_k, min_keep), V);
    std::vector<float> sorted(s, s + V);
    std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<float>());
    const float kth = sorted[k - 1];
    for (int64_t i = 0; i < V; ++i)
      if (s[i] < kth) s[i] = kNegInf;  // ties with the k-th are kept, as the reference does
  }
  if (o.top_p < 1.0) {
    // Ascending order; drop the low tokens whose cumulative probability stays <= 1 - top_p, keeping at
    // least min_keep of the highest.
    std::vector<int64_t> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[a] < s[b]; });
    const float mx = s[order[V - 1]];
    double sum = 0.0;
    for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(s[i] - mx));
    const float threshold = static_cast<float>(1.0 - o.top_p);
    std::vector<int64_t> drop;
    double cum = 0.0;
    for (int64_t r = 0; r < V - min_keep; ++r) {
      cum += static_cast<float>(std::exp(static_cast<double>(s[order[r]] - mx)) / sum);
      if (static_cast<float>(cum) <= threshold) drop.push_back(order[r]);
      else break;
    }
    for (int64_t i : drop) s[i] = kNegInf;
  }
}

int32_t sample_token(const float* s, int64_t V, std::mt19937_64& rng) {
  const float mx = *std::max_element(s, s + V);
  if (mx == kNegInf || std::isnan(mx)) fail(ErrorKind::Internal, "sampling: no token has a non-zero probability");
  std::vector<double> w(static_cast<size_t>(V));
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) total += (w[i] = std::exp(static_cast<double>(s[i] - mx)));
  return static_cast<int32_t>(draw(w, total, rng));
}

std::mt19937_64 make_rng(const GenerationOptions& o) {
  return std::mt19937_64(o.seed ? *o.seed
                                : (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}());
}

Generation::Generation(const GenerationOptions& o, const SpecialTokens& sp, int64_t vocab,
                       std::vector<std::vector<int32_t>> prefixes, std::mt19937_64* rng, TokenCallback on_token)
    : o_(o), sp_(sp), V_(vocab), beam_(o.num_beams > 1), seqs_(std::move(prefixes)), on_token_(std::move(on_token)) {
  const int E = rows_per_item(o);
  if (static_cast<int>(seqs_.size()) != E)
    fail(ErrorKind::Internal, "generation: " + std::to_string(seqs_.size()) + " prefixes for " + std::to_string(E) + " rows");
  if (beam_ && 2 * static_cast<int64_t>(o.num_beams) > V_)
    usage("--num-beams " + std::to_string(o.num_beams) + " is too large for a vocabulary of " + std::to_string(V_));
  if (rng) {
    rng_ = rng;
  } else {
    own_rng_ = std::make_unique<std::mt19937_64>(make_rng(o));
    rng_ = own_rng_.get();
  }
  for (const auto& s : seqs_) prefix_len_.push_back(s.size());
  feed_.assign(static_cast<size_t>(E), sp.pad);
  parents_.resize(static_cast<size_t>(E));
  std::iota(parents_.begin(), parents_.end(), 0);
  row_score_.assign(static_cast<size_t>(E), 0.0f);
  row_done_.assign(static_cast<size_t>(E), false);
  if (beam_) {
    running_.assign(static_cast<size_t>(E), kRuledOut);
    running_[0] = 0.0f;  // only the first beam is live at the start: the others hold the same sequence
  }
}

bool Generation::reordered() const {
  for (size_t k = 0; k < parents_.size(); ++k)
    if (parents_[k] != static_cast<int>(k)) return true;
  return false;
}

bool Generation::start_step() {
  std::iota(parents_.begin(), parents_.end(), 0);
  if (done_) {
    std::fill(feed_.begin(), feed_.end(), sp_.pad);  // its rows idle; nothing of theirs is used
    return false;
  }
  last_ = step_ + 1 == o_.max_new_tokens;
  ++step_;
  return true;
}

void Generation::choose(int r, int32_t next, float log_prob) {
  row_score_[r] += log_prob;
  seqs_[r].push_back(next);
  feed_[r] = next;
  if (next == sp_.eos) row_done_[r] = true;
  if (on_token_) on_token_(r, next);
}

void Generation::finish_rows() {
  done_ = last_ || std::all_of(row_done_.begin(), row_done_.end(), [](bool d) { return d; });
}

bool Generation::needs_logits() const {
  if (done_) return false;
  if (beam_ || o_.do_sample || o_.repetition_penalty != 1.0 || o_.no_repeat_ngram_size > 0) return true;
  for (int r = 0; r < rows(); ++r) {  // end-of-sequence still suppressed for some row
    const int64_t L = static_cast<int64_t>(seqs_[r].size());
    if (!row_done_[r] && (L < o_.min_length || L - static_cast<int64_t>(prefix_len_[r]) < o_.min_new_tokens)) return true;
  }
  return false;
}

// NaN or infinite logits (NaN weights, an overflow) would still pick tokens, and a normal-looking answer would
// hide a broken model: refuse them. `values` are a row's logits (n = V), or its greedy pick's log-probability
// (n = 1), which ops::greedy_pick makes NaN when the row's logits hold a NaN or an infinity.
void Generation::refuse_non_finite(int64_t row, const float* values, int64_t n) const {
  for (int64_t v = 0; v < n; ++v)
    if (!std::isfinite(values[v]))
      fail(ErrorKind::Model, "the model's logits hold " + (n > 1 ? fmt(values[v]) : std::string("non-finite values")) +
                                 " (" + (n > 1 ? "token " + std::to_string(v) : "row " + std::to_string(row)) +
                                 ", step " + std::to_string(step_) +
                                 "): its weights or computation produce non-finite values; no text would be meaningful");
}

void Generation::advance(const ops::Pick* picks) {
  if (needs_logits()) fail(ErrorKind::Internal, "generation: this step needs the logits, not greedy picks");
  if (!start_step()) return;
  for (int r = 0; r < rows(); ++r)
    if (!row_done_[r]) refuse_non_finite(r, &picks[r].log_prob, 1);
  for (int r = 0; r < rows(); ++r) {
    if (row_done_[r]) feed_[r] = sp_.pad;  // finished rows keep feeding padding, as the reference does
    else choose(r, picks[r].id, picks[r].log_prob);
  }
  finish_rows();
}

void Generation::advance(const float* logits) {
  const int K = rows();
  if (!start_step()) return;
  const int64_t V = V_;
  const bool last = last_;
  for (int r = 0; r < K; ++r)
    if (beam_ || !row_done_[r]) refuse_non_finite(r, logits + r * V, V);

  if (!beam_) {
    std::vector<float> buf(static_cast<size_t>(V));
    for (int r = 0; r < K; ++r) {
      if (row_done_[r]) {
        feed_[r] = sp_.pad;  // finished rows keep feeding padding, as the reference does
        continue;
      }
      const float* raw = logits + r * V;
      std::copy(raw, raw + V, buf.begin());
      process_scores(buf.data(), V, seqs_[r], prefix_len_[r], o_, sp_);
      int32_t next;
      if (o_.do_sample) {
        warp_scores(buf.data(), V, o_, 1);
        next = sample_token(buf.data(), V, *rng_);
      } else {
        next = static_cast<int32_t>(std::max_element(buf.begin(), buf.end()) - buf.begin());  // first maximum
      }
      choose(r, next, ops::log_softmax_at(raw, V, next));
    }
    finish_rows();
    return;
  }

  // Beam search over this item's K beams.
  const int C = 2 * K;  // candidates kept per step: enough that K of them do not end
  std::vector<float> acc(static_cast<size_t>(K * V));
  for (int k = 0; k < K; ++k) {
    float* lp = acc.data() + k * V;
    std::copy(logits + k * V, logits + (k + 1) * V, lp);
    log_softmax(lp, V);  // beam search processes log-probabilities, not logits
    process_scores(lp, V, seqs_[k], prefix_len_[k], o_, sp_);
    if (o_.do_sample) warp_scores(lp, V, o_, 2);  // keep an alternative to eos
    for (int64_t v = 0; v < V; ++v) lp[v] += running_[k];
  }
  const std::vector<Candidate> cand = o_.do_sample ? sampled_candidates(acc, V, C, *rng_) : top_candidates(acc, V, C);

  // Candidates that end here: an eos, or any token at the length limit.
  std::vector<bool> ends(static_cast<size_t>(C));
  for (int j = 0; j < C; ++j) ends[j] = cand[j].token == sp_.eos || last;

  // Among the first K, those that end are offered to the finished set (after the ones already there).
  const int generated = step_;
  for (int j = 0; j < K; ++j) {
    if (!ends[j]) continue;
    Hypothesis h{seqs_[cand[j].beam], normalise(cand[j].score, generated, o_.length_penalty)};
    h.tokens.push_back(cand[j].token);
    finished_.push_back(std::move(h));
  }
  std::stable_sort(finished_.begin(), finished_.end(),
                   [](const Hypothesis& a, const Hypothesis& c) { return a.score > c.score; });
  if (static_cast<int>(finished_.size()) > K) finished_.resize(static_cast<size_t>(K));

  // The best K that do not end continue (ended ones are ruled out; they can only fill in at the limit).
  std::vector<std::pair<float, int>> running;
  for (int j = 0; j < C; ++j) running.emplace_back(cand[j].score + (ends[j] ? kRuledOut : 0.0f), j);
  std::stable_sort(running.begin(), running.end(), [](const auto& a, const auto& c) { return a.first > c.first; });
  std::vector<std::vector<int32_t>> next_seqs(static_cast<size_t>(K));
  for (int k = 0; k < K; ++k) {
    const Candidate& c = cand[running[k].second];
    running_[k] = running[k].first;
    next_seqs[k] = seqs_[c.beam];
    next_seqs[k].push_back(c.token);
    parents_[k] = c.beam;
    feed_[k] = c.token;
  }
  seqs_ = std::move(next_seqs);

  // Done at the length limit, or once the finished set is full and (early_stopping) the best running beam
  // cannot beat its worst: scored at the current length (Hugging Face's heuristic, early_stopping=False),
  // at the longest length still allowed ("never", where a positive length penalty rewards length), or
  // without asking (true).
  const int bound_len = o_.early_stopping == EarlyStopping::Never && o_.length_penalty > 0.0 ? o_.max_new_tokens
                                                                                             : generated;
  done_ = last || (static_cast<int>(finished_.size()) == K &&
                   (o_.early_stopping == EarlyStopping::Always ||
                    !(normalise(running_[0], bound_len, o_.length_penalty) > finished_.back().score)));
}

std::vector<GeneratedSequence> Generation::results() const {
  std::vector<GeneratedSequence> out;
  for (int i = 0; i < o_.num_return_sequences; ++i) {
    GeneratedSequence g;
    if (beam_) {
      if (i < static_cast<int>(finished_.size())) {
        g.ids = without_prefix(finished_[i].tokens, prefix_len_[0]);
        g.score = finished_[i].score;
      }
    } else {
      g.ids = without_prefix(seqs_[i], prefix_len_[i]);
      g.score = row_score_[i];
    }
    out.push_back(std::move(g));
  }
  return out;
}

std::vector<std::vector<GeneratedSequence>> generate(
    const std::function<std::unique_ptr<Decoder>(int expand)>& start, int batch, const GenerationOptions& o,
    const SpecialTokens& sp, const TokenCallback& on_token) {
  validate(o);
  if (batch < 1) fail(ErrorKind::Internal, "generate: empty batch");
  const int E = rows_per_item(o);  // decoder rows per batch item
  auto dec = start(E);
  const int R = batch * E;
  const int64_t V = dec->vocab_size();
  if (dec->rows() != R) fail(ErrorKind::Internal, "generate: the decoder has the wrong number of rows");

  // One generation per item, sharing one random generator in item order (so a seed reproduces the batch).
  std::mt19937_64 rng = make_rng(o);
  std::vector<Generation> items;
  items.reserve(static_cast<size_t>(batch));
  for (int b = 0; b < batch; ++b) {
    std::vector<std::vector<int32_t>> prefixes;
    for (int e = 0; e < E; ++e) prefixes.push_back(dec->prefix(b * E + e));
    TokenCallback cb;
    if (on_token) cb = [&on_token, b, E](int row, int32_t token) { on_token(b * E + row, token); };
    items.emplace_back(o, sp, V, std::move(prefixes), &rng, std::move(cb));
  }

  std::vector<int32_t> feed(static_cast<size_t>(R), sp.pad);
  std::vector<int> src(static_cast<size_t>(R));
  for (int step = 0;; ++step) {
    Tensor logits = step == 0 ? dec->start() : dec->step(feed);
    // On a GPU, when no item needs the distribution (greedy, nothing to process), the pick is made there
    // and only rows × (id, log-probability) come back; otherwise the logits do.
    const bool pick_on_device =
        logits.device != Device::CPU &&
        std::none_of(items.begin(), items.end(), [](const Generation& g) { return g.needs_logits(); });
    std::vector<ops::Pick> picks;
    if (pick_on_device) picks = ops::greedy_pick(logits);
    else logits = on_host(std::move(logits));
    bool all_done = true, moved = false;
    for (int b = 0; b < batch; ++b) {
      const int64_t row0 = static_cast<int64_t>(b) * E;
      if (pick_on_device) items[b].advance(picks.data() + row0);
      else items[b].advance(logits.ptr() + row0 * V);
      all_done = all_done && items[b].done();
      moved = moved || items[b].reordered();
      for (int e = 0; e < E; ++e) {
        src[b * E + e] = b * E + items[b].parents()[e];
        feed[b * E + e] = items[b].feed()[e];
      }
    }
    if (all_done) break;
    if (moved) dec->reorder(src);
  }

  std::vector<std::vector<GeneratedSequence>> out;
  for (const Generation& g : items) out.push_back(g.results());
  return out;
}

GenerationOptions generation_defaults(const std::string& model_dir) {
  GenerationOptions o;
  const std::string path = (std::filesystem::path(model_dir) / "generation_config.json").string();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return o;  // none (or no directory): the load reports it
  const nlohmann::json j =
      nlohmann::json::parse(read_file(path, kMaxConfigFileBytes, ErrorKind::Model, "config file"), nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail(ErrorKind::Model, path + ": not a JSON object");
  const auto bad = [&](const char* key, const char* what) {
    fail(ErrorKind::Model, path + ": field '" + key + "' must be " + what);
  };
  const auto get_int = [&](const char* key, int& v, int lo) {
    if (!j.contains(key) || j[key].is_null()) return false;
    if (!j[key].is_number_integer() || j[key].get<int64_t>() < lo || j[key].get<int64_t>() > (1 << 20))
      bad(key, "an integer in range");
    v = j[key].get<int>();
    return true;
  };
  const auto get_double = [&](const char* key, double& v) {
    if (!j.contains(key) || j[key].is_null()) return;
    if (!j[key].is_number()) bad(key, "a number");
    v = j[key].get<double>();
  };
  int max_length = 0;
  if (!get_int("max_new_tokens", o.max_new_tokens, 1) && get_int("max_length", max_length, 1))
    o.max_new_tokens = std::max(1, max_length - 1);  // max_length counts the decoder start token
  get_int("min_new_tokens", o.min_new_tokens, 0);
  get_int("min_length", o.min_length, 0);
  get_int("num_beams", o.num_beams, 1);
  get_int("no_repeat_ngram_size", o.no_repeat_ngram_size, 0);
  get_int("num_return_sequences", o.num_return_sequences, 1);
  get_int("top_k", o.top_k, 0);
  get_double("length_penalty", o.length_penalty);
  get_double("repetition_penalty", o.repetition_penalty);
  get_double("temperature", o.temperature);
  get_double("top_p", o.top_p);
  if (j.contains("early_stopping") && !j["early_stopping"].is_null()) {
    const nlohmann::json& e = j["early_stopping"];
    if (e.is_boolean()) o.early_stopping = e.get<bool>() ? EarlyStopping::Always : EarlyStopping::Heuristic;
    else if (e == "never") o.early_stopping = EarlyStopping::Never;
    else bad("early_stopping", "true, false or \"never\"");
  }
  if (j.contains("do_sample") && !j["do_sample"].is_null()) {
    if (!j["do_sample"].is_boolean()) bad("do_sample", "true or false");
    o.do_sample = j["do_sample"].get<bool>();
  }
  return o;
}

void apply_preset(GenerationOptions& o, const std::string& preset) {
  if (preset != "caption" && preset != "vqa") usage("--preset must be caption or vqa (got '" + preset + "')");
  // LAVIS Blip2T5.generate / predict_answers: beam search, no sampling, no penalties, one answer.
  o.do_sample = false;
  o.num_beams = 5;
  o.num_return_sequences = 1;
  o.repetition_penalty = 1.0;
  o.no_repeat_ngram_size = 0;
  o.min_new_tokens = 0;
  o.min_length = 1;  // LAVIS passes min_length=1, which counts the start token: it suppresses nothing
  if (preset == "caption") {
    o.max_new_tokens = 30;
    o.length_penalty = 1.0;
  } else {
    o.max_new_tokens = 10;
    o.length_penalty = -1.0;
  }
}

std::string preset_prompt(const std::string& preset, const std::string& text) {
  return preset == "vqa" ? "Question: " + text + " Answer:" : text;
}

}  // namespace blip2
