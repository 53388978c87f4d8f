// Conversation prompts for chatting about one image: each turn's prompt is the previous turns plus the new
// question, "Question: {q1} Answer: {a1}. Question: {q2} Answer:", cut from the oldest turn when it would
// not fit the model's prompt limit.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"

namespace blip2 {

struct ChatTurn {
  std::string question, answer;
};

// The prompt for `question` after history[first..]: each earlier turn as "Question: … Answer: ….", joined
// by a space, then "Question: … Answer:".
inline std::string chat_prompt(const std::vector<ChatTurn>& history, const std::string& question, size_t first = 0) {
  std::string p;
  for (size_t i = first; i < history.size(); ++i)
    p += "Question: " + history[i].question + " Answer: " + history[i].answer + ". ";
  return p + "Question: " + question + " Answer:";
}

// The prompt with the most recent turns that fit in `max_tokens` (as counted by `count_tokens`, which
// tokenizes a prompt the way the model will); `kept` receives how many turns it holds. Throws Error(Input)
// when the question alone does not fit.
inline std::string fit_chat_prompt(const std::vector<ChatTurn>& history, const std::string& question, int64_t max_tokens,
                                   const std::function<int64_t(const std::string&)>& count_tokens,
                                   size_t* kept = nullptr) {
  for (size_t first = 0; first <= history.size(); ++first) {
    std::string p = chat_prompt(history, question, first);
    const int64_t n = count_tokens(p);
    if (n <= max_tokens) {
      if (kept) *kept = history.size() - first;
      return p;
    }
    if (first == history.size())
      fail(ErrorKind::Input, "question is too long: its prompt has " + std::to_string(n) +
                                 " tokens, the model takes at most " + std::to_string(max_tokens));
  }
  return {};  // not reached
}

}  // namespace blip2
