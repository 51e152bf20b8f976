// The model object of formats/SPEC.md as plain numbers, and the per-rank layout derived from it.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common.h"

namespace q3p {

enum class RopeType : uint8_t { Default, Linear, Yarn };

struct RopeConfig {
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  double factor = 1.0;                          // linear, yarn
  double original_max_position_embeddings = 0;  // yarn
  double beta_fast = 32.0, beta_slow = 1.0;     // yarn
  bool truncate = true;                         // yarn
  double attention_factor = 1.0;                // yarn: multiplies cos and sin
};

struct ModelConfig {
  int64_t hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0;
  int64_t num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0;
  int64_t vocab_size = 0, max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  std::vector<bool> sliding;  // one per layer: layer_types[i] == "sliding_attention"
  int64_t sliding_window = 0;  // 0 when no layer slides
  bool tie_word_embeddings = false;
};

// Per-rank geometry: what SPEC's layout object holds, recomputed from the model and W.
struct Layout {
  int64_t world_size = 1;
  DType dtype = DType::F32;
  int64_t padded_vocab_size = 0;
  int64_t heads_per_rank = 0;     // Nq
  int64_t kv_heads_per_rank = 0;  // Nkv
  int64_t kv_head_replicas = 1;
  int64_t intermediate_per_rank = 0;  // I
  int64_t vocab_rows_per_rank = 0;    // V
  // Groups of weight matrices (embed, lm_head, qkv, o_proj, gate_up, down) stored in another dtype.
  std::map<std::string, DType> dtype_overrides;
  DType group_dtype(const std::string& group) const {
    auto it = dtype_overrides.find(group);
    return it == dtype_overrides.end() ? dtype : it->second;
  }
  // True when some group of weight matrices is stored in `dt`.
  bool stores(DType dt) const {
    if (dtype == dt) return true;
    for (const auto& group : dtype_overrides)
      if (group.second == dt) return true;
    return false;
  }
};

// Checks the model's numbers (positive sizes, heads divisible, ...); throws FormatError.
void validate_model(const ModelConfig& m);
// The layout a world of `world_size` ranks must have; throws FormatError when W does not fit.
Layout derive_layout(const ModelConfig& m, int64_t world_size, DType dtype);
// Throws FormatError naming the field when `given` differs from `derived`.
void check_layout(const Layout& given, const Layout& derived);

// RoPE inverse frequencies (head_dim / 2 of them) and the cos/sin scale, as transformers computes them.
struct RopeTables {
  std::vector<float> inv_freq;
  float attention_factor = 1.0f;
};
RopeTables compute_rope(const ModelConfig& m);

}  // namespace q3p
