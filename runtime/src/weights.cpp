#include "weights.h"

#include <algorithm>
#include <map>

#include "crc32c.h"

namespace q3p {

namespace {

struct Expected {
  std::vector<int64_t> shape;
  DType dtype;
  TensorView* slot;
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

}  // namespace

RankWeights bind_rank_weights(const MappedFile& file, uint64_t data_offset,
                              const std::vector<TensorRecord>& records, const ModelConfig& m,
                              const Layout& l, bool verify_crc) {
  const std::string& path = file.path();
  const uint64_t file_size = file.size();
  auto fail = [&](const std::string& tensor, const std::string& what) -> void {
    throw FormatError(path + ": tensor '" + tensor + "': " + what);
  };

  RankWeights w;
  w.layers.resize(static_cast<size_t>(m.num_hidden_layers));
  const int64_t H = m.hidden_size, D = m.head_dim;
  const int64_t Nq = l.heads_per_rank, Nkv = l.kv_heads_per_rank, I = l.intermediate_per_rank;
  const int64_t V = l.vocab_rows_per_rank;

  std::map<std::string, Expected> expected;
  expected["model.embed_tokens.weight"] = {{V, H}, l.group_dtype("embed"), &w.embed};
  if (!m.tie_word_embeddings) expected["lm_head.weight"] = {{V, H}, l.group_dtype("lm_head"), &w.lm_head};
  expected["model.norm.weight"] = {{H}, DType::F32, &w.final_norm};
  for (int64_t i = 0; i < m.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights& L = w.layers[static_cast<size_t>(i)];
    expected[p + "input_layernorm.weight"] = {{H}, DType::F32, &L.input_norm};
    expected[p + "self_attn.qkv_proj.weight"] = {{(Nq + 2 * Nkv) * D, H}, l.group_dtype("qkv"), &L.qkv};
    expected[p + "self_attn.q_norm.weight"] = {{D}, DType::F32, &L.q_norm};
    expected[p + "self_attn.k_norm.weight"] = {{D}, DType::F32, &L.k_norm};
    expected[p + "self_attn.o_proj.weight"] = {{H, Nq * D}, l.group_dtype("o_proj"), &L.o_proj};
    expected[p + "post_attention_layernorm.weight"] = {{H}, DType::F32, &L.post_norm};
    expected[p + "mlp.gate_up_proj.weight"] = {{2 * I, H}, l.group_dtype("gate_up"), &L.gate_up};
    expected[p + "mlp.down_proj.weight"] = {{H, I}, l.group_dtype("down"), &L.down};
  }

  // 1. Each record on its own: dtype, shape, nbytes, alignment, bounds.
  std::vector<const TensorRecord*> by_offset;
  std::map<std::string, const TensorRecord*> seen;
  for (const TensorRecord& r : records) {
    DType dt;
    if (!parse_dtype(r.dtype, &dt)) fail(r.name, "unknown dtype '" + r.dtype + "'");
    if (r.shape.empty() || r.shape.size() > 2) fail(r.name, "shape " + shape_str(r.shape) + " must have 1 or 2 axes");
    for (int64_t d : r.shape) {
      if (d <= 0) fail(r.name, "shape " + shape_str(r.shape) + " has an axis <= 0");
      if (d > (int64_t(1) << 32)) fail(r.name, "shape " + shape_str(r.shape) + " overflows (an axis above 2^32)");
    }
    // A row of `cols` values (q8: whole blocks), times the rows: no overflow, each axis <= 2^32.
    const uint64_t rows = r.shape.size() == 2 ? static_cast<uint64_t>(r.shape[0]) : 1;
    uint64_t want_bytes;
    if (!checked_mul(rows, row_bytes(dt, static_cast<uint64_t>(r.shape.back())), &want_bytes) || want_bytes != r.nbytes)
      fail(r.name, "nbytes " + std::to_string(r.nbytes) + " differs from shape " + shape_str(r.shape) + " of " +
                       dtype_name(dt) + " (" + std::to_string(want_bytes) + " bytes)");
    if (r.offset % 64 != 0) fail(r.name, "offset " + std::to_string(r.offset) + " is not a multiple of 64");
    if (r.offset < data_offset)
      fail(r.name, "offset " + std::to_string(r.offset) + " lies before the data section (" +
                       std::to_string(data_offset) + ")");
    uint64_t end;
    if (!checked_add(r.offset, r.nbytes, &end) || end > file_size)
      fail(r.name, "bytes [" + std::to_string(r.offset) + ", +" + std::to_string(r.nbytes) +
                       ") run past the end of the file (" + std::to_string(file_size) + " bytes)");
    if (!seen.emplace(r.name, &r).second) fail(r.name, "appears twice in the tensor table");
    by_offset.push_back(&r);
  }
  // 2. No two records overlap.
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorRecord* a, const TensorRecord* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorRecord* a = by_offset[i - 1];
    if (a->offset + a->nbytes > by_offset[i]->offset)  // both checked above: no overflow
      fail(by_offset[i]->name, "overlaps tensor '" + a->name + "'");
  }
  // 3. Exactly the expected tensors, with the expected geometry.
  for (const auto& kv : seen)
    if (!expected.count(kv.first)) {
      if (kv.first == "lm_head.weight") fail(kv.first, "present but the model ties its embeddings");
      fail(kv.first, "is not a tensor of this model");
    }
  for (auto& kv : expected) {
    auto it = seen.find(kv.first);
    if (it == seen.end()) fail(kv.first, "missing from the rank file");
    const TensorRecord& r = *it->second;
    DType dt;
    parse_dtype(r.dtype, &dt);
    if (r.shape != kv.second.shape)
      fail(kv.first, "shape " + shape_str(r.shape) + " but the model and layout imply " + shape_str(kv.second.shape));
    if (dt != kv.second.dtype)
      fail(kv.first, std::string("dtype ") + dtype_name(dt) + " but expected " + dtype_name(kv.second.dtype));
    TensorView& v = *kv.second.slot;
    v.data = file.data() + r.offset;
    v.dtype = dt;
    v.rows = r.shape.size() == 2 ? r.shape[0] : 1;
    v.cols = r.shape.back();
  }
  if (m.tie_word_embeddings) w.lm_head = w.embed;
  // 4. Checksums (verify="full").
  if (verify_crc) {
    for (const TensorRecord* r : by_offset) {
      uint32_t crc = crc32c(0, file.data() + r->offset, static_cast<size_t>(r->nbytes));
      if (crc != r->crc32c) fail(r->name, "CRC32C mismatch: the data is corrupt");
    }
  }
  return w;
}

}  // namespace q3p
