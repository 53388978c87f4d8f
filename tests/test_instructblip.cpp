// InstructBLIP against transformers 4.44 (tests/fixtures/tiny-instructblip-{t5,vicuna}): the configs in
// their diff form, Vicuna's tokenizer with the real checkpoint's quirks, the prompts as both tokenizers give
// them, every stage tensor of every case, and every decoding setting token for token.
#include <gtest/gtest.h>

#include <algorithm>

#include "core/error.h"
#include "generate/generate.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/blip2.h"
#include "support.h"
#include "text/llama_tokenizer.h"

using namespace blip2;
using namespace blip2::test;

namespace {

const std::string kT5 = kFixtures + "/tiny-instructblip-t5";
const std::string kVicuna = kFixtures + "/tiny-instructblip-vicuna";

TEST(InstructBlipConfig, DiffFormTakesTheConfigClassDefaults) {
  const Blip2Config t5 = load_config(kT5);
  EXPECT_TRUE(t5.instruct);
  EXPECT_EQ(t5.family, LanguageFamily::T5);
  EXPECT_EQ(t5.vision.image_size, 224);  // absent: InstructBlipVisionConfig's defaults
  EXPECT_EQ(t5.vision.patch_size, 14);
  EXPECT_EQ(t5.qformer.cross_attention_frequency, 2);
  EXPECT_EQ(t5.num_query_tokens, 8);

  const Blip2Config v = load_config(kVicuna);
  EXPECT_TRUE(v.instruct);
  ASSERT_EQ(v.family, LanguageFamily::Llama);
  const LlamaConfig& l = v.llama;
  EXPECT_EQ(l.hidden_size, 64);
  EXPECT_EQ(l.intermediate_size, 160);
  EXPECT_EQ(l.num_layers, 3);
  EXPECT_EQ(l.num_heads, 4);
  EXPECT_EQ(l.num_kv_heads, 4);
  EXPECT_EQ(l.vocab_size, 1001);
  EXPECT_FLOAT_EQ(l.rope_theta, 10000.0f);
  EXPECT_FLOAT_EQ(l.rms_norm_eps, 1e-6f);
  EXPECT_EQ(l.architecture, "LLaMAForCausalLM");
  // The hub's quirks: generation ends at text_config's eos 1, and pad -1 means none.
  EXPECT_EQ(v.eos_token_id(), 1);
  EXPECT_FALSE(l.pad_token_id.has_value());
  EXPECT_EQ(v.lm_width(), 64);
}

TEST(InstructBlipConfig, LlamaDefaultsAndRefusals) {
  const auto with_text = [](const std::string& text) {
    return parse_config(R"({"model_type": "instructblip", "text_config": )" + text + "}", "config.json");
  };
  const Blip2Config c = with_text(R"({"model_type": "llama", "num_attention_heads": 8})");
  EXPECT_EQ(c.llama.num_kv_heads, 8);  // None: as many as the query heads
  EXPECT_EQ(c.llama.hidden_size, 4096);
  EXPECT_EQ(c.llama.max_position_embeddings, 2048);
  EXPECT_EQ(c.llama.eos_token_id, 2);
  EXPECT_EQ(with_text(R"({"model_type": "llama", "num_key_value_heads": 8})").llama.num_kv_heads, 8);
  const auto refused = [&](const std::string& text, const std::string& what) {
    try {
      with_text(text);
      ADD_FAILURE() << text << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Model);
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  refused(R"({"model_type": "llama", "hidden_act": "gelu"})", "text_config.hidden_act");
  refused(R"({"model_type": "llama", "attention_bias": true})", "text_config.attention_bias");
  refused(R"({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}})", "text_config.rope_scaling");
  refused(R"({"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 5})", "num_key_value_heads");
  refused(R"({"model_type": "llama", "rope_theta": -1})", "text_config.rope_theta");
  // LLaMA is InstructBLIP's only: a BLIP-2 config naming it is refused as before.
  try {
    parse_config(R"({"model_type": "blip-2", "text_config": {"model_type": "llama"}})", "config.json");
    ADD_FAILURE() << "blip-2 with llama accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Flan-T5 (\"t5\") or OPT (\"opt\")"), std::string::npos) << e.what();
  }
}

// Every language-model entry of tokenization_reference.json: ids (BOS `</s>` first) and the decoded text.
TEST(VicunaTokenizer, MatchesTransformers) {
  const LlamaTokenizer tok(kVicuna);
  EXPECT_EQ(tok.vocab_size(), 1001);
  EXPECT_EQ(tok.prompt_pad_id(), 1000);
  const auto entries = read_json(kVicuna + "/tokenization_reference.json")["language_model"];
  ASSERT_GE(entries.size(), 10u);
  for (const auto& e : entries) {
    const std::string text = e["text"].get<std::string>();
    const auto ids = e["hf_ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok.encode(text), ids) << text;
    EXPECT_EQ(tok.decode(ids), e["hf_decode_skip_special"].get<std::string>()) << text;
  }
}

TEST(VicunaTokenizer, MissingModelFileIsAModelError) {
  try {
    LlamaTokenizer tok(kT5);  // has spiece.model, not tokenizer.model
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Model);
    EXPECT_NE(std::string(e.what()).find("tokenizer.model"), std::string::npos) << e.what();
  }
}

}  // namespace
