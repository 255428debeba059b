/* The functions cffi generates from provider/entry.py's @ffi.def_extern callbacks. */
#ifndef P11GRID_PYTHON_CALLBACKS_H
#define P11GRID_PYTHON_CALLBACKS_H

#include <p11-kit/pkcs11.h>
#include "entry_points.h"

unsigned long p11grid_py_alive(void);
CK_RV p11grid_py_C_Initialize(CK_VOID_PTR pInitArgs);

#define DECLARE_SERVED(name, params, args) CK_RV p11grid_py_##name params;
#define DECLARE_NOTHING(name, params, refusal)
P11GRID_ENTRY_POINTS(DECLARE_SERVED, DECLARE_NOTHING)
#undef DECLARE_SERVED
#undef DECLARE_NOTHING

int p11grid_native_owns_interpreter(void);
void p11grid_native_set_initialized(int initialized);

#endif
