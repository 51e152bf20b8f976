#include "model_config.h"

#include <algorithm>
#include <cmath>

namespace q3p {

namespace {
void need(bool ok, const std::string& what) {
  if (!ok) throw FormatError("model object: " + what);
}
}  // namespace

// The same rules as the manifest schema's model definition (schema/manifest.schema.json), which
// the converter and `qwen3pack validate` apply: what converts and validates also loads.
void validate_model(const ModelConfig& m) {
  const int64_t kMaxDim = int64_t(1) << 24;  // keeps every product below in 64 bits
  const int64_t kMaxLayers = 1024;
  auto in_range = [&](int64_t v, int64_t max, const char* name) {
    need(v > 0 && v <= max, std::string(name) + " = " + std::to_string(v) + " is out of range [1, " +
                                std::to_string(max) + "]");
  };
  auto pos = [&](int64_t v, const char* name) { in_range(v, kMaxDim, name); };
  pos(m.hidden_size, "hidden_size");
  pos(m.intermediate_size, "intermediate_size");
  in_range(m.num_hidden_layers, kMaxLayers, "num_hidden_layers");
  pos(m.num_attention_heads, "num_attention_heads");
  pos(m.num_key_value_heads, "num_key_value_heads");
  pos(m.head_dim, "head_dim");
  pos(m.vocab_size, "vocab_size");
  pos(m.max_position_embeddings, "max_position_embeddings");
  need(m.head_dim % 2 == 0, "head_dim must be even for rotary embeddings");
  need(m.num_attention_heads % m.num_key_value_heads == 0,
       "num_attention_heads must be a multiple of num_key_value_heads");
  need(std::isfinite(m.rms_norm_eps) && m.rms_norm_eps > 0, "rms_norm_eps must be a finite number > 0");
  need(static_cast<int64_t>(m.sliding.size()) == m.num_hidden_layers,
       "layer_types must have one entry per layer");
  bool any_sliding = std::find(m.sliding.begin(), m.sliding.end(), true) != m.sliding.end();
  need(!any_sliding || m.sliding_window > 0, "sliding layers need a sliding_window >= 1");
  const RopeConfig& r = m.rope;
  need(std::isfinite(r.theta) && r.theta > 1.0, "rope theta must be > 1");
  if (r.type != RopeType::Default)
    need(std::isfinite(r.factor) && r.factor >= 1, "rope factor must be >= 1");
  if (r.type == RopeType::Yarn) {
    need(std::isfinite(r.original_max_position_embeddings) && r.original_max_position_embeddings > 0,
         "yarn original_max_position_embeddings must be > 0");
    need(std::isfinite(r.beta_fast) && r.beta_fast > 0 && std::isfinite(r.beta_slow) && r.beta_slow > 0,
         "yarn beta_fast and beta_slow must be > 0");
    need(std::isfinite(r.attention_factor) && r.attention_factor > 0, "yarn attention_factor must be > 0");
  }
}

Layout derive_layout(const ModelConfig& m, int64_t W, DType dtype) {
  need(W >= 1 && W <= 4096, "world size " + std::to_string(W) + " is out of range");
  Layout l;
  l.world_size = W;
  l.dtype = dtype;
  const std::string ws = " (world size " + std::to_string(W) + ")";
  need(m.num_attention_heads % W == 0, "num_attention_heads is not divisible by the world size" + ws);
  need(m.intermediate_size % W == 0, "intermediate_size is not divisible by the world size" + ws);
  l.heads_per_rank = m.num_attention_heads / W;
  if (m.num_key_value_heads >= W) {
    need(m.num_key_value_heads % W == 0, "num_key_value_heads is not divisible by the world size" + ws);
    l.kv_heads_per_rank = m.num_key_value_heads / W;
    l.kv_head_replicas = 1;
  } else {
    need(W % m.num_key_value_heads == 0, "the world size is not a multiple of num_key_value_heads" + ws);
    l.kv_heads_per_rank = 1;
    l.kv_head_replicas = W / m.num_key_value_heads;
  }
  need(l.heads_per_rank % l.kv_heads_per_rank == 0, "q heads of a rank do not group over its KV heads" + ws);
  l.intermediate_per_rank = m.intermediate_size / W;
  l.padded_vocab_size = (m.vocab_size + W - 1) / W * W;
  l.vocab_rows_per_rank = l.padded_vocab_size / W;
  return l;
}

void check_layout(const Layout& g, const Layout& d) {
  auto eq = [](int64_t a, int64_t b, const char* name) {
    if (a != b)
      throw FormatError(std::string("layout object: ") + name + " = " + std::to_string(a) +
                        " but the model and world size imply " + std::to_string(b));
  };
  eq(g.world_size, d.world_size, "world_size");
  eq(g.padded_vocab_size, d.padded_vocab_size, "padded_vocab_size");
  eq(g.heads_per_rank, d.heads_per_rank, "heads_per_rank");
  eq(g.kv_heads_per_rank, d.kv_heads_per_rank, "kv_heads_per_rank");
  eq(g.kv_head_replicas, d.kv_head_replicas, "kv_head_replicas");
  eq(g.intermediate_per_rank, d.intermediate_per_rank, "intermediate_per_rank");
  eq(g.vocab_rows_per_rank, d.vocab_rows_per_rank, "vocab_rows_per_rank");
}

// Mirrors transformers/modeling_rope_utils.py: the frequencies are float32 tensors there, so each
// step is rounded to float here the same way (base ** (arange(0, dim, 2) / dim) in float32, ...).
RopeTables compute_rope(const ModelConfig& m) {
  const RopeConfig& r = m.rope;
  const int64_t dim = m.head_dim;
  const int64_t half = dim / 2;
  RopeTables t;
  t.inv_freq.resize(static_cast<size_t>(half));
  std::vector<float> pos_freqs(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    float expo = static_cast<float>(2 * i) / static_cast<float>(dim);  // arange(0,dim,2).float() / dim
    pos_freqs[i] = static_cast<float>(std::pow(static_cast<double>(static_cast<float>(r.theta)),
                                               static_cast<double>(expo)));
  }
  if (r.type == RopeType::Default || r.type == RopeType::Linear) {
    for (int64_t i = 0; i < half; ++i) {
      float f = 1.0f / pos_freqs[i];
      if (r.type == RopeType::Linear) f = f / static_cast<float>(r.factor);
      t.inv_freq[i] = f;
    }
    return t;
  }
  // YaRN.
  const double base = r.theta, factor = r.factor, omax = r.original_max_position_embeddings;
  auto correction_dim = [&](double rotations) {
    return (static_cast<double>(dim) * std::log(omax / (rotations * 2.0 * M_PI))) / (2.0 * std::log(base));
  };
  double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
  if (r.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // transformers: prevent singularity
  for (int64_t i = 0; i < half; ++i) {
    float extrapolation = 1.0f / pos_freqs[i];
    float interpolation = 1.0f / (static_cast<float>(factor) * pos_freqs[i]);
    // (arange(dim/2, float32) - min) / (max - min), clamped: computed in float32 by torch
    float linear = (static_cast<float>(i) - static_cast<float>(low)) / static_cast<float>(high - low);
    float ramp = std::min(1.0f, std::max(0.0f, linear));
    float extrapolation_factor = 1.0f - ramp;
    t.inv_freq[i] = interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
  }
  t.attention_factor = static_cast<float>(r.attention_factor);
  return t;
}

}  // namespace q3p
