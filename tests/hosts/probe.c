/*
 * A minimal C host: dlopen a PKCS#11 module (RTLD_LOCAL, as most hosts do), call a fixed
 * sequence of entry points and print each CK_RV as "name 0x..." on its own line.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#include <p11-kit/pkcs11.h>

#define SHOW(name, call) printf("%s 0x%lx\n", name, (unsigned long)(call))

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODULE\n", argv[0]);
        return 2;
    }
    void *handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    CK_C_GetFunctionList get_list = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    CK_FUNCTION_LIST_PTR f = NULL;
    if (get_list == NULL || get_list(&f) != CKR_OK) {
        fprintf(stderr, "no function list\n");
        return 2;
    }
    CK_INFO info;
    CK_ULONG count = 0;
    CK_SESSION_HANDLE session = 0;
    SHOW("C_GetInfo", f->C_GetInfo(&info));
    SHOW("C_Initialize", f->C_Initialize(NULL));
    SHOW("C_GetInfo", f->C_GetInfo(&info));
    SHOW("C_GetSlotList", f->C_GetSlotList(CK_FALSE, NULL, &count));
    SHOW("C_OpenSession", f->C_OpenSession(0, CKF_SERIAL_SESSION, NULL, NULL, &session));
    SHOW("C_CreateObject", f->C_CreateObject(session, NULL, 0, NULL));
    SHOW("C_CloseSession", f->C_CloseSession(session));
    SHOW("C_Finalize", f->C_Finalize(NULL));
    return 0;
}
