// Makes the extension importable as lsr_fast._C; importing it runs the static TORCH_LIBRARY
// registrations. Only the Python build compiles this file (the CMake LibTorch library does not).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}
