// The Python module stub: `import attnkit._C` loads this shared library, whose static
// initialisers register every op with the dispatcher. No Python API lives here; the LibTorch
// build (examples/cpp) leaves this file out.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "attnkit op library (ops live in torch.ops.attnkit)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
