#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "common.h"

namespace q3p {

namespace {
uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

Rng::Rng(uint64_t seed) {
  for (uint64_t& s : s_) s = splitmix64(seed);
}

uint64_t Rng::next() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

void validate(const SamplingParams& p) {
  auto bad = [](const std::string& what) { throw UsageError(what); };
  if (!std::isfinite(p.temperature) || p.temperature < 0) bad("temperature must be >= 0");
  if (p.top_k < 0) bad("top_k must be >= 0 (0 turns it off)");
  if (!(p.top_p > 0 && p.top_p <= 1)) bad("top_p must be in (0, 1]");
  if (!(p.min_p >= 0 && p.min_p <= 1)) bad("min_p must be in [0, 1]");
  if (!std::isfinite(p.presence_penalty)) bad("presence_penalty must be finite");
  if (!std::isfinite(p.repetition_penalty) || p.repetition_penalty <= 0) bad("repetition_penalty must be > 0");
}

Sampler::Sampler(const SamplingParams& params, uint64_t seed, size_t vocab_size)
    : p_(params), rng_(seed), vocab_(vocab_size), seen_(vocab_size, 0), generated_(vocab_size, 0) {
  validate(p_);
}

void Sampler::add_prompt(const int32_t* ids, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (ids[i] >= 0 && static_cast<size_t>(ids[i]) < vocab_) seen_[static_cast<size_t>(ids[i])] = 1;
}

void Sampler::accept(int32_t token) {
  if (token < 0 || static_cast<size_t>(token) >= vocab_) return;
  seen_[static_cast<size_t>(token)] = 1;
  generated_[static_cast<size_t>(token)] = 1;
}

int32_t Sampler::sample(const float* logits) {
  const size_t n = vocab_;
  work_.assign(logits, logits + n);
  float* x = work_.data();
  // Penalties, in the order of transformers' processors (repetition first).
  if (p_.repetition_penalty != 1.0) {
    const float rp = static_cast<float>(p_.repetition_penalty);
    for (size_t i = 0; i < n; ++i)
      if (seen_[i]) x[i] = x[i] < 0 ? x[i] * rp : x[i] / rp;
  }
  if (p_.presence_penalty != 0.0) {
    const float pp = static_cast<float>(p_.presence_penalty);
    for (size_t i = 0; i < n; ++i)
      if (generated_[i]) x[i] -= pp;
  }
  // Greedy: the first maximum, as torch.argmax.
  if (p_.temperature <= 0.0) {
    size_t best = 0;
    for (size_t i = 1; i < n; ++i)
      if (x[i] > x[best]) best = i;
    return static_cast<int32_t>(best);
  }
  // The temperature divides differences to the best logit, in double, never the logits
  // themselves: logit / T overflows to inf for a tiny T, and (x - top) / T <= 0 cannot, so a tiny
  // T tends to greedy as it should. Dividing by T > 0 keeps the order, so candidates are ranked
  // on the raw logits.
  const double temperature = p_.temperature;

  // Candidates in a fixed order: by logit descending, ties by id (only when a filter needs it).
  order_.resize(n);
  std::iota(order_.begin(), order_.end(), 0);
  auto before = [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
  auto sort_head = [&](size_t k) {
    std::partial_sort(order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(k), order_.end(), before);
  };
  size_t count = n;
  if (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < n) {
    count = static_cast<size_t>(p_.top_k);
    sort_head(count);
  } else if (p_.top_p < 1.0) {
    sort_head(std::min<size_t>(n, 1024));  // usually enough: see the top-p step
  } else {
    size_t best = 0;  // only the maximum is needed
    for (size_t i = 1; i < n; ++i)
      if (x[i] > x[best]) best = i;
    std::swap(order_[0], order_[best]);
  }
  auto fill_weights = [&](double* total) {
    const double top = static_cast<double>(x[order_[0]]);
    weights_.resize(count);
    *total = 0.0;
    for (size_t i = 0; i < count; ++i) {
      weights_[i] = std::exp((static_cast<double>(x[order_[i]]) - top) / temperature);
      *total += weights_[i];
    }
  };
  double total;
  fill_weights(&total);
  // top-p: the smallest prefix of the sorted candidates whose probability reaches top_p. Only
  // a sorted head of 1024 may exist: when the prefix does not end inside it, sort everything.
  if (p_.top_p < 1.0) {
    const size_t head = (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < n) ? count : std::min<size_t>(n, 1024);
    auto prefix = [&]() {
      double acc = 0.0;
      size_t keep = 0;
      while (keep < count) {
        acc += weights_[keep++];
        if (acc >= p_.top_p * total) break;
      }
      return keep;
    };
    size_t keep = prefix();
    if (keep > head) {  // ran past the sorted head
      std::sort(order_.begin(), order_.end(), before);
      fill_weights(&total);
      keep = prefix();
    }
    count = keep;
    total = 0.0;
    for (size_t i = 0; i < count; ++i) total += weights_[i];
  }
  // min-p: drop candidates below min_p times the most likely one (whose weight is 1).
  if (p_.min_p > 0.0) {
    total = 0.0;
    for (size_t i = 0; i < count; ++i) {
      if (weights_[i] < p_.min_p) weights_[i] = 0.0;
      total += weights_[i];
    }
  }
  const double u = rng_.uniform() * total;
  double acc = 0.0;
  for (size_t i = 0; i < count; ++i) {
    acc += weights_[i];
    if (u < acc) return order_[i];
  }
  // Rounding left u at the very top: the last candidate with weight.
  for (size_t i = count; i-- > 0;)
    if (weights_[i] > 0) return order_[i];
  return order_[0];
}

}  // namespace q3p
