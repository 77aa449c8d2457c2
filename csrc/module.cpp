// The pybind11 module petal_fast._C. Ops register themselves with
// TORCH_LIBRARY_FRAGMENT(petal_fast, m) in their own source file (one file per op) and are
// called from Python as torch.ops.petal_fast.<name>; importing this module loads them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "petal_fast CPU backend (ops live in torch.ops.petal_fast)";
}
