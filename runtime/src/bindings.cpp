// The nanobind module qwen3pack._core: the Python face of the C++ core.
#include <nanobind/nanobind.h>

#include "crc32c.h"

namespace nb = nanobind;

namespace {

// Accepts any object with the buffer protocol (bytes, memoryview, numpy arrays, mmap).
uint32_t crc32c_of_buffer(nb::handle buffer, uint32_t crc) {
  Py_buffer view;
  if (PyObject_GetBuffer(buffer.ptr(), &view, PyBUF_SIMPLE) != 0) throw nb::python_error();
  uint32_t result;
  {
    nb::gil_scoped_release release;
    result = q3p::crc32c(crc, view.buf, static_cast<size_t>(view.len));
  }
  PyBuffer_Release(&view);
  return result;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "qwen3pack's C++ core";
  m.def("crc32c", &crc32c_of_buffer, nb::arg("buffer"), nb::arg("crc") = 0,
        "CRC32C (Castagnoli) of a contiguous buffer, continuing from `crc` (0 to start).");
}
