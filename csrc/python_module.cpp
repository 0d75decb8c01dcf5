// The Python extension module fastattn._C holds no Python bindings: ops are registered with
// the dispatcher by TORCH_LIBRARY (csrc/fastattn.cpp) when the shared library is loaded, and
// are reached as torch.ops.fastattn.*. This empty module only lets `import fastattn._C` load
// the library. It is compiled by setup.py / jit.py only; the CMake (libtorch) build leaves it out.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
