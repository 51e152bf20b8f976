// Choosing the next token from logits: penalties, greedy or temperature with top-k, top-p and
// min-p, drawn with our own seeded generator (xoshiro256**, seeded by splitmix64; the uniform
// double is the top 53 bits), so a seed gives the same tokens on every machine and build.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace q3p {

class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t next();
  double uniform();  // in [0, 1)

 private:
  uint64_t s_[4];
};

struct SamplingParams {
  double temperature = 0.0;         // <= 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;                // 0: off
  double top_p = 1.0;               // 1: off
  double min_p = 0.0;               // 0: off
  double presence_penalty = 0.0;    // subtracted once from every token already generated
  double repetition_penalty = 1.0;  // transformers': over prompt and generated tokens
};

// Throws UsageError on out-of-range parameters.
void validate(const SamplingParams& p);

class Sampler {
 public:
  Sampler(const SamplingParams& params, uint64_t seed, size_t vocab_size);
  // Tokens of the prompt (repetition penalty only) and generated tokens (both penalties).
  void add_prompt(const int32_t* ids, size_t n);
  void accept(int32_t token);
  // The next token for `logits` (vocab_size values; not modified).
  int32_t sample(const float* logits);
  size_t vocab_size() const { return vocab_; }

 private:
  SamplingParams p_;
  Rng rng_;
  size_t vocab_;
  std::vector<uint8_t> seen_, generated_;
  std::vector<float> work_;
  std::vector<int32_t> order_;
  std::vector<double> weights_;
};

}  // namespace q3p
