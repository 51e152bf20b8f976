// One rank's weights: the tensor table checked against the mapping and the model geometry,
// then plain pointers into the read-only mapping (the weights are never copied).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "mapped_file.h"
#include "model_config.h"

namespace q3p {

// One record of a rank header's tensor table, as the caller parsed it.
struct TensorRecord {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t offset = 0;
  uint64_t nbytes = 0;
  uint32_t crc32c = 0;
};

// A matrix [rows, cols] (or a vector: rows == 1) inside the mapping.
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  const float* f32() const { return static_cast<const float*>(data); }
};

struct LayerWeights {
  TensorView input_norm, qkv, q_norm, k_norm, o_proj, post_norm, gate_up, down;
};

struct RankWeights {
  TensorView embed, lm_head, final_norm;  // lm_head aliases embed for tied models
  std::vector<LayerWeights> layers;
};

// Checks every record (dtype, shape, nbytes, alignment, bounds with overflow-safe arithmetic, no
// overlap, no duplicate), that exactly the tensors of SPEC exist with the shapes the model and
// layout imply, then (when verify_crc) each tensor's CRC32C. Throws FormatError naming the file
// and the tensor. On success, returns views into `file`'s mapping.
RankWeights bind_rank_weights(const MappedFile& file, uint64_t data_offset,
                              const std::vector<TensorRecord>& records, const ModelConfig& model,
                              const Layout& layout, bool verify_crc);

}  // namespace q3p
