"""Build build/libp11grid.so: native/ (the C edge) + provider/ (Python) via cffi embedding.

Run with the project's virtualenv Python: its site-packages is recorded in the library so
that a C host started outside the virtualenv (nginx, openssl, pkcs11-tool) finds our code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parent
NATIVE = ROOT / "native"
BUILD = ROOT / "build"
P11KIT_INCLUDE = Path("/usr/include/p11-kit-1")
MODULE_NAME = "_p11grid_embed"
C_FLAGS = ["-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror"]

# The C types Python reads and writes; cffi checks each layout against pkcs11.h.
CDEF_TYPES = """
typedef unsigned long CK_ULONG;
typedef unsigned long CK_RV;
typedef unsigned long CK_FLAGS;
typedef unsigned long CK_SLOT_ID;
typedef unsigned long CK_SESSION_HANDLE;
typedef unsigned long CK_OBJECT_HANDLE;
typedef unsigned long CK_MECHANISM_TYPE;
typedef unsigned long CK_USER_TYPE;
typedef unsigned long CK_ATTRIBUTE_TYPE;
typedef unsigned char CK_BYTE;
typedef unsigned char CK_BBOOL;
typedef unsigned char CK_UTF8CHAR;
typedef struct { CK_BYTE major; CK_BYTE minor; } CK_VERSION;
typedef struct {
    CK_VERSION cryptokiVersion; CK_UTF8CHAR manufacturerID[32]; CK_FLAGS flags;
    CK_UTF8CHAR libraryDescription[32]; CK_VERSION libraryVersion;
} CK_INFO;
typedef struct {
    CK_UTF8CHAR slotDescription[64]; CK_UTF8CHAR manufacturerID[32]; CK_FLAGS flags;
    CK_VERSION hardwareVersion; CK_VERSION firmwareVersion;
} CK_SLOT_INFO;
typedef struct {
    CK_UTF8CHAR label[32]; CK_UTF8CHAR manufacturerID[32]; CK_UTF8CHAR model[16];
    CK_BYTE serialNumber[16]; CK_FLAGS flags;
    CK_ULONG ulMaxSessionCount; CK_ULONG ulSessionCount;
    CK_ULONG ulMaxRwSessionCount; CK_ULONG ulRwSessionCount;
    CK_ULONG ulMaxPinLen; CK_ULONG ulMinPinLen;
    CK_ULONG ulTotalPublicMemory; CK_ULONG ulFreePublicMemory;
    CK_ULONG ulTotalPrivateMemory; CK_ULONG ulFreePrivateMemory;
    CK_VERSION hardwareVersion; CK_VERSION firmwareVersion; CK_BYTE utcTime[16];
} CK_TOKEN_INFO;
typedef struct {
    CK_SLOT_ID slotID; CK_ULONG state; CK_FLAGS flags; CK_ULONG ulDeviceError;
} CK_SESSION_INFO;
typedef struct {
    CK_ULONG ulMinKeySize; CK_ULONG ulMaxKeySize; CK_FLAGS flags;
} CK_MECHANISM_INFO;
typedef struct { CK_ATTRIBUTE_TYPE type; void *pValue; CK_ULONG ulValueLen; } CK_ATTRIBUTE;
typedef struct {
    CK_MECHANISM_TYPE mechanism; void *pParameter; CK_ULONG ulParameterLen;
} CK_MECHANISM;
typedef struct { CK_MECHANISM_TYPE hashAlg; CK_ULONG mgf; CK_ULONG sLen; } CK_RSA_PKCS_PSS_PARAMS;
typedef struct {
    CK_MECHANISM_TYPE hashAlg; CK_ULONG mgf; CK_ULONG source;
    void *pSourceData; CK_ULONG ulSourceDataLen;
} CK_RSA_PKCS_OAEP_PARAMS;
typedef struct {
    CK_RV (*CreateMutex)(void **); CK_RV (*DestroyMutex)(void *);
    CK_RV (*LockMutex)(void *); CK_RV (*UnlockMutex)(void *);
    CK_FLAGS flags; void *pReserved;
} CK_C_INITIALIZE_ARGS;

int p11grid_native_owns_interpreter(void);
void p11grid_native_set_initialized(int initialized);
int p11grid_native_await_readable(int fd, long spin_us);
"""

# Every function Python serves: (name, C parameter list). Must match native/entry_points.h.
SERVED = [
    ("C_Initialize", "void *pInitArgs"),
    ("C_Finalize", "void *pReserved"),
    ("C_GetInfo", "CK_INFO *pInfo"),
    ("C_GetSlotList", "CK_BBOOL tokenPresent, CK_SLOT_ID *pSlotList, CK_ULONG *pulCount"),
    ("C_GetSlotInfo", "CK_SLOT_ID slotID, CK_SLOT_INFO *pInfo"),
    ("C_GetTokenInfo", "CK_SLOT_ID slotID, CK_TOKEN_INFO *pInfo"),
    ("C_GetMechanismList",
     "CK_SLOT_ID slotID, CK_MECHANISM_TYPE *pMechanismList, CK_ULONG *pulCount"),
    ("C_GetMechanismInfo",
     "CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO *pInfo"),
    ("C_OpenSession", "CK_SLOT_ID slotID, CK_FLAGS flags, void *pApplication, void *Notify, "
                      "CK_SESSION_HANDLE *phSession"),
    ("C_CloseSession", "CK_SESSION_HANDLE hSession"),
    ("C_CloseAllSessions", "CK_SLOT_ID slotID"),
    ("C_GetSessionInfo", "CK_SESSION_HANDLE hSession, CK_SESSION_INFO *pInfo"),
    ("C_Login", "CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR *pPin, "
                "CK_ULONG ulPinLen"),
    ("C_Logout", "CK_SESSION_HANDLE hSession"),
    ("C_GetAttributeValue", "CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, "
                            "CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount"),
    ("C_FindObjectsInit", "CK_SESSION_HANDLE hSession, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount"),
    ("C_FindObjects", "CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE *phObject, "
                      "CK_ULONG ulMaxObjectCount, CK_ULONG *pulObjectCount"),
    ("C_FindObjectsFinal", "CK_SESSION_HANDLE hSession"),
    ("C_DecryptInit",
     "CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hKey"),
    ("C_Decrypt", "CK_SESSION_HANDLE hSession, CK_BYTE *pEncryptedData, "
                  "CK_ULONG ulEncryptedDataLen, CK_BYTE *pData, CK_ULONG *pulDataLen"),
    ("C_DigestInit", "CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism"),
    ("C_Digest", "CK_SESSION_HANDLE hSession, CK_BYTE *pData, CK_ULONG ulDataLen, "
                 "CK_BYTE *pDigest, CK_ULONG *pulDigestLen"),
    ("C_DigestUpdate", "CK_SESSION_HANDLE hSession, CK_BYTE *pPart, CK_ULONG ulPartLen"),
    ("C_DigestFinal", "CK_SESSION_HANDLE hSession, CK_BYTE *pDigest, CK_ULONG *pulDigestLen"),
    ("C_SignInit", "CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hKey"),
    ("C_Sign", "CK_SESSION_HANDLE hSession, CK_BYTE *pData, CK_ULONG ulDataLen, "
               "CK_BYTE *pSignature, CK_ULONG *pulSignatureLen"),
    ("C_SignUpdate", "CK_SESSION_HANDLE hSession, CK_BYTE *pPart, CK_ULONG ulPartLen"),
    ("C_SignFinal", "CK_SESSION_HANDLE hSession, CK_BYTE *pSignature, CK_ULONG *pulSignatureLen"),
    ("C_VerifyInit", "CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hKey"),
    ("C_Verify", "CK_SESSION_HANDLE hSession, CK_BYTE *pData, CK_ULONG ulDataLen, "
                 "CK_BYTE *pSignature, CK_ULONG ulSignatureLen"),
    ("C_VerifyUpdate", "CK_SESSION_HANDLE hSession, CK_BYTE *pPart, CK_ULONG ulPartLen"),
    ("C_VerifyFinal", "CK_SESSION_HANDLE hSession, CK_BYTE *pSignature, CK_ULONG ulSignatureLen"),
    ("C_GenerateRandom", "CK_SESSION_HANDLE hSession, CK_BYTE *RandomData, CK_ULONG ulRandomLen"),
]

INIT_CODE = r'''
import os, site, sys

def _p11grid_add_site(recorded):
    chosen = os.environ.get("P11GRID_SITE_PACKAGES") or recorded
    from _p11grid_embed import lib
    before = list(sys.path)
    for entry in chosen.split(os.pathsep):
        if entry:
            site.addsitedir(entry)
    added = [p for p in sys.path if p not in before]
    if lib.p11grid_native_owns_interpreter():
        # Our own interpreter (C host): the virtualenv wins over system packages.
        sys.path[:] = added + [p for p in sys.path if p not in added]
    # In a Python host, the host's sys.path stays first: we only append.

_p11grid_add_site(%(site)r)
del _p11grid_add_site

from _p11grid_embed import ffi, lib
import provider.entry
provider.entry.install(ffi, lib)
'''


def embedding_api() -> str:
    lines = ["unsigned long p11grid_py_alive(void);"]
    lines += [f"CK_RV p11grid_py_{name}({params});" for name, params in SERVED]
    return "\n".join(lines)


def site_packages() -> str:
    paths = sysconfig.get_paths()
    seen: list[str] = []
    for key in ("purelib", "platlib"):
        if paths[key] not in seen:
            seen.append(paths[key])
    return os.pathsep.join(seen)


def python_includes() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["include"], paths["platinclude"]})


def compile_native() -> Path:
    """Our C is compiled on its own so that -Werror judges our code, not cffi's."""
    obj = BUILD / "native" / "p11grid.o"
    obj.parent.mkdir(parents=True, exist_ok=True)
    recorded = site_packages()
    # The interpreter libpython belongs to (the virtualenv's base), not the venv's link.
    interpreter = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    for value in (recorded, interpreter):
        if any(c in value for c in '"\\\n'):
            raise SystemExit(f"build.py: cannot record a path like {value!r}")
    cmd = ["cc", *C_FLAGS, *[f"-I{p}" for p in python_includes()], f"-I{P11KIT_INCLUDE}",
           f"-I{NATIVE}", f'-DP11GRID_SITE_PACKAGES="{recorded}"',
           f'-DP11GRID_PYTHON="{interpreter}"',
           "-c", str(NATIVE / "p11grid.c"), "-o", str(obj)]
    subprocess.run(cmd, check=True)
    return obj


def main() -> int:
    if not (P11KIT_INCLUDE / "p11-kit" / "pkcs11.h").exists():
        print("build.py: /usr/include/p11-kit-1/p11-kit/pkcs11.h is missing; "
              "install the Debian package libp11-kit-dev", file=sys.stderr)
        return 1
    if sys.prefix == sys.base_prefix:
        print("build.py: warning: not running inside a virtualenv; recording "
              f"{site_packages()}", file=sys.stderr)
    obj = compile_native()
    ffi = cffi.FFI()
    ffi.cdef(CDEF_TYPES)
    ffi.embedding_api(embedding_api())
    ffi.set_source(
        MODULE_NAME,
        "#include <p11-kit/pkcs11.h>\n"
        "int p11grid_native_owns_interpreter(void);\n"
        "void p11grid_native_set_initialized(int initialized);\n"
        "int p11grid_native_await_readable(int fd, long spin_us);\n",
        include_dirs=[str(P11KIT_INCLUDE), str(NATIVE)],
        extra_objects=[str(obj)],
        extra_link_args=[f"-Wl,--version-script={NATIVE / 'exports.map'}", "-ldl",
                         "-lpthread"],
    )
    ffi.embedding_init_code(INIT_CODE % {"site": site_packages()})
    tmp = BUILD / "cffi"
    tmp.mkdir(parents=True, exist_ok=True)
    built = ffi.compile(tmpdir=str(tmp), target="libp11grid.*", verbose=False)
    target = BUILD / "libp11grid.so"
    # A new inode, renamed into place: processes running the old library keep it intact.
    staging = target.with_suffix(".so.new")
    shutil.copyfile(built, staging)
    os.replace(staging, target)
    print(f"build.py: wrote {target} (site-packages recorded: {site_packages()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
