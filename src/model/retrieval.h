// BLIP-2 for image–text retrieval (Blip2ForImageTextRetrieval, e.g. Salesforce/blip2-itm-vit-g): the ViT and
// the Q-Former with its text input, no language model. docs/RETRIEVAL.md gives the contract.
//   image ─ ViT ─ vision_last_hidden_state ─┬─ Q-Former(queries) ─ vision_projection ─ L2 norm ─ image_embeds [Q, E]
//                                           └─ Q-Former([queries ; text], cross-attention for the queries)
//   text ─ BERT ids ─────────────────────────┴─ itm_head on each query ─ mean ─ itm_logits [2] (ITM)
//   text ─ BERT ids ─ Q-Former(text alone) ─ [CLS] ─ text_projection ─ L2 norm ─ text_embeds [E]
//   itc similarity(image, text) = max over the Q queries of image_embeds[q] · text_embeds (a cosine)
#pragma once
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "io/config.h"
#include "model/load_options.h"
#include "model/qformer.h"
#include "model/vision.h"
#include "text/bert_tokenizer.h"

namespace blip2 {

// ITM for P (image, text) pairs.
struct MatchScores {
  Tensor qformer_itm_hidden_state;  // [P, Q + L, d], on the model's device (rows past a text's length: padding)
  Tensor itm_logits;                // [P, 2] on the host: column 0 "no match", column 1 "match"
  std::vector<float> itm_probability;  // softmax(itm_logits)[:, 1]
};

// The text side of ITC.
struct TextEmbeddings {
  Tensor qformer_text_hidden_state;  // [B, L, d], on the model's device
  Tensor text_embeds;                // [B, E] on the host, unit length
};

// Items of a batch-major tensor, by index (repeats allowed): the image an ITM pair uses, say.
Tensor gather_items(const Tensor& t, const std::vector<int64_t>& items);

class RetrievalModel {
 public:
  // Loads a Blip2ForImageTextRetrieval directory (weights, BERT tokenizer files at its top). Throws
  // Error(Model) naming what is wrong, or what the checkpoint is for when it is a captioning one.
  RetrievalModel(const std::string& model_dir, const LoadOptions& options = {},
                 const Checkpoint::Progress& progress = nullptr);

  const Blip2Config& config() const { return cfg_; }
  Device device() const { return device_; }
  const BertTokenizer& tokenizer() const { return tokenizer_; }
  int embedding_size() const { return cfg_.image_text_hidden_size; }

  // Texts as [CLS] … [SEP] ids, right-padded. Error(Input) for a text longer than the Q-Former's positions.
  TokenBatch tokenize(const std::vector<std::string>& texts) const;
  // pixels [B, 3, S, S] -> vision_last_hidden_state [B, T_img, Dv] on the model's device: what the image
  // cache keeps, as ITM and the image embeddings both start from it.
  Tensor encode_vision(const Tensor& pixels) const;
  // ITM, item p of `vision` with text p.
  MatchScores match(const Tensor& vision, const TokenBatch& texts) const;
  // [B, Q, E] on the host, each query's embedding of unit length.
  Tensor image_embeds(const Tensor& vision) const;
  TextEmbeddings text_embeds(const TokenBatch& texts) const;
  // itc_logits_per_image [Bi, Bt]: for each image and text the largest cosine over the image's queries.
  static Tensor similarity(const Tensor& image_embeds, const Tensor& text_embeds);

  // How many times the ViT has run (encode_vision) on this model.
  int64_t image_encodings() const { return image_encodings_.load(); }
  const VisionModel& vision_model() const { return vision_; }
  const QFormer& qformer_model() const { return qformer_; }

 private:
  Blip2Config cfg_;
  Device device_ = Device::CPU;
  std::unique_ptr<Checkpoint> ckpt_;  // owns the mappings the weights view
  VisionModel vision_;
  QFormer qformer_;
  Weight vision_proj_w_, vision_proj_b_, text_proj_w_, text_proj_b_, itm_w_, itm_b_;
  BertTokenizer tokenizer_;
  mutable std::atomic<int64_t> image_encodings_{0};
};

}  // namespace blip2
