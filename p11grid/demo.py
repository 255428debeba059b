"""`make demo`: nginx serves TLS 1.2 and 1.3 with keys held in the grid of secure elements,
unlocked by the identity chain (IAM CA, hypervisor key, OpenID provider, VM-Auth-Token).

Steps: build a sandbox (its grid service hosts the token); verify the VM-Auth-Token check
by check, as the module does before its first session; sign through our module with
the OpenSSL CLI (libp11 engine) and check the signatures against the certificates; sign
again through OpenSSL 3's pkcs11-provider where it is installed (Debian 13 on); start
nginx with both keys; fetch pages with curl, which verifies the server against the
sandbox CA; show from the grid's audit log that the signatures were made in the grid, by
the VM's identity, and that each session was authorized by the three elements; swap the
token for a foreign one and show the module refusing with its reason; stop everything.
Exits non-zero with the reason and the tails of nginx's and the module's logs on any
failure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from p11grid import nginx, paths, sandbox, sandbox_grid, sandbox_identity, snippets

OK = "✓"
FAILED = "✗"
TLS_VERSIONS: dict[str, list[str]] = {
    "TLSv1.2": ["--tlsv1.2", "--tls-max", "1.2"],
    "TLSv1.3": ["--tlsv1.3"],
}
CURL_TIMEOUT_SECONDS = 30
OPENSSL_TIMEOUT_SECONDS = 60
CLIENT_HANDSHAKE = re.compile(r"SSL connection using (\S+) / (\S+)")
SERVER_ANSWER = re.compile(r"key=(\S+) protocol=(\S+) cipher=(\S+)")


def _say(line: str = "") -> None:
    print(line, flush=True)


@dataclass
class Tally:
    """What passed and what failed, with the reasons."""

    passed: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, line: str, reason: str = "") -> bool:
        if ok:
            self.passed += 1
            _say(f"  {OK} {line}")
        else:
            self.failures.append(f"{line}: {reason}" if reason else line)
            _say(f"  {FAILED} {line}" + (f"\n      {reason}" if reason else ""))
        return ok


def _client_environment() -> dict[str, str]:
    # curl and the checks must not load our engine: they play the remote peer.
    return {k: v for k, v in os.environ.items() if k not in {"OPENSSL_CONF", "P11GRID_CONF"}}


def _verify_signature(certificate_pem: Path, digest: bytes, signature: bytes) -> str:
    """'' if the signature over the SHA-256 digest verifies with the certificate's key."""
    public_key = x509.load_pem_x509_certificate(certificate_pem.read_bytes()).public_key()
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        else:
            return f"unexpected key type {type(public_key).__name__}"
    except InvalidSignature:
        return "the signature does not verify with the certificate's public key"
    return ""


def check_openssl_signing(
    box: sandbox.Sandbox, variables: dict[str, str], openssl_conf: Path, tally: Tally
) -> None:
    """The OpenSSL CLI signs through the engine; the certificate's public key verifies it."""
    message = b"p11grid demo: signed inside the secure element\n"
    digest = hashlib.sha256(message).digest()
    digest_file = box.directory / "demo-digest.bin"
    digest_file.write_bytes(digest)
    environment = {
        **os.environ,
        "OPENSSL_CONF": str(openssl_conf),
        "P11GRID_CONF": variables["P11GRID_CONF"],
        "SOFTHSM2_CONF": variables["SOFTHSM2_CONF"],
    }
    _sign_each_key(
        box, variables, environment, digest, tally,
        lambda uri: ["openssl", "pkeyutl", "-engine", "pkcs11", "-keyform", "engine",
                     "-inkey", uri, "-sign", "-in", str(digest_file)],
        what="openssl pkeyutl -sign", timeout_hint="", through="from the token")


def _sign_each_key(
    box: sandbox.Sandbox, variables: dict[str, str], environment: dict[str, str],
    digest: bytes, tally: Tally, command_for: Callable[[str], list[str]], what: str,
    timeout_hint: str, through: str,
) -> None:
    """`openssl pkeyutl` signs `digest` with vm-rsa and vm-ec by their URIs; each signature
    must verify with the key's certificate."""
    for label, uri in (("vm-rsa", variables["P11GRID_RSA_URI"]),
                       ("vm-ec", variables["P11GRID_EC_URI"])):  # fmt: skip
        command = command_for(uri)
        if label == "vm-rsa":
            command += ["-pkeyopt", "digest:sha256"]  # PKCS#1 v1.5 with a DigestInfo
        attempt = f"{what} with {uri}"
        try:
            result = subprocess.run(command, env=environment, capture_output=True,
                                    timeout=OPENSSL_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            tally.check(False, attempt,
                        f"no answer within {OPENSSL_TIMEOUT_SECONDS} s{timeout_hint}")
            continue
        if result.returncode != 0 or not result.stdout:
            reason = result.stderr.decode(errors="replace").strip().splitlines()
            tally.check(False, attempt, " | ".join(reason[-4:]) or f"exit {result.returncode}")
            continue
        problem = _verify_signature(box.certificate(label), digest, result.stdout)
        tally.check(not problem,
                    f"{label}: {len(result.stdout)}-byte signature {through} verifies with "
                    f"{box.certificate(label).name}",
                    problem)


def check_provider_signing(
    box: sandbox.Sandbox, variables: dict[str, str], direct: bool, tally: Tally
) -> None:
    """OpenSSL 3 signs through pkcs11-provider with the config `p11grid config openssl
    --provider` prints; the certificates' public keys verify. One line if it is absent."""
    provider = snippets.find_pkcs11_provider()
    major = snippets.debian_major()
    if provider is None:
        reason = snippets.pkcs11_provider_missing_reason(major)
        if major is not None and major >= snippets.PKCS11_PROVIDER_FIRST_DEBIAN:
            tally.check(False, "pkcs11-provider is installed", reason)
        else:
            _say(f"  - provider path skipped: {reason}")
        return
    pin_file = box.directory / "provider.pin"
    pin_file.touch(mode=0o600)
    pin_file.write_text(variables["P11GRID_PIN"] + "\n")
    # --direct: SoftHSM2 itself, which needs `no-deinit` (it crashes at exit otherwise).
    module = Path(variables["P11GRID_DIRECT_MODULE"] if direct else variables["P11GRID_MODULE"])
    conf = box.directory / "openssl-provider.cnf"
    conf.write_text(snippets.openssl_provider_conf(
        provider, module, None, pin_file, "p11grid demo: pkcs11-provider",
        quirks=("no-deinit",) if direct else ()))
    message = b"p11grid demo: signed through pkcs11-provider\n"
    digest = hashlib.sha256(message).digest()
    digest_file = box.directory / "demo-provider-digest.bin"
    digest_file.write_bytes(digest)
    environment = {**os.environ, "OPENSSL_CONF": str(conf),
                   "P11GRID_CONF": variables["P11GRID_CONF"],
                   "SOFTHSM2_CONF": variables["SOFTHSM2_CONF"]}
    _sign_each_key(
        box, variables, environment, digest, tally,
        lambda uri: ["openssl", "pkeyutl", "-sign", "-inkey", uri, "-in", str(digest_file)],
        what="pkcs11-provider: openssl pkeyutl -sign",
        timeout_hint=" (docs/openssl-provider.md)",
        through=f"through pkcs11-provider ({provider.name}, {conf.name})")


def fetch(
    server: nginx.NginxServer, label: str, tls_version: str, ca_file: Path
) -> tuple[bool, str]:
    """One HTTPS request with curl; (ok, what was negotiated or why it failed)."""
    port = server.ports[label]
    command = [
        "curl", "--silent", "--show-error", "--verbose",
        "--max-time", str(CURL_TIMEOUT_SECONDS),
        "--cacert", str(ca_file),
        "--resolve", f"localhost:{port}:127.0.0.1",
        *TLS_VERSIONS[tls_version],
        "--write-out", "\nhttp=%{http_code} verify=%{ssl_verify_result} "
                       "handshake=%{time_appconnect}s",
        server.url(label),
    ]  # fmt: skip
    try:
        result = subprocess.run(
            command,
            env=_client_environment(),
            capture_output=True,
            text=True,
            timeout=CURL_TIMEOUT_SECONDS + 5,
        )
    except subprocess.TimeoutExpired:
        return False, "curl did not finish in time"
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("curl:")]
        return False, (errors[-1] if errors else f"curl exit {result.returncode}")
    answer = SERVER_ANSWER.search(result.stdout)
    client = CLIENT_HANDSHAKE.search(result.stderr)
    status = result.stdout.strip().splitlines()[-1]
    if not answer or "http=200" not in status or "verify=0" not in status:
        return False, f"unexpected answer {result.stdout.strip()!r}"
    served_key, protocol, cipher = answer.groups()
    if served_key != label or protocol != tls_version:
        return False, f"server used key {served_key} over {protocol}, expected {label}"
    if client and client.group(1) != protocol:
        return False, f"curl saw {client.group(1)} but nginx saw {protocol}"
    handshake = status.split("handshake=")[-1]
    return True, f"{protocol} {cipher} (handshake {handshake})"


def check_tls(server: nginx.NginxServer, ca_file: Path, requests: int, tally: Tally) -> None:
    for label in server.ports:
        for tls_version in TLS_VERSIONS:
            outcomes = [fetch(server, label, tls_version, ca_file) for _ in range(requests)]
            failed = [detail for ok, detail in outcomes if not ok]
            detail = outcomes[-1][1] if not failed else failed[0]
            tally.check(
                not failed,
                f"{label} {tls_version}: {requests - len(failed)}/{requests} requests to "
                f"{server.url(label)} verified by the sandbox CA"
                + (f", {detail}" if not failed else ""),
                detail if failed else "",
            )


def check_module_in_nginx(
    server: nginx.NginxServer, workers: list[int], module_log: Path, tally: Tally
) -> None:
    """Our module's log names the processes that loaded it: nginx's master and workers."""
    try:
        text = module_log.read_text(errors="replace")
    except OSError:
        _say(f"  note: {module_log} does not exist; cannot tell which processes used the module")
        return
    seen = {int(pid) for pid in re.findall(r"\[(\d+)\]", text)}
    used = [pid for pid in workers if pid in seen]
    if server.pid in seen and used:
        tally.check(
            True,
            f"{module_log.name}: the module ran in nginx's master (pid {server.pid}) and in "
            f"{len(used)} of {len(workers)} workers after fork (pids {', '.join(map(str, used))})",
        )
    else:
        _say(f"  note: {module_log.name} names none of nginx's pids ({server.pid}, {workers})")


def _run_sandbox_command(action: str, directory: Path) -> subprocess.CompletedProcess[str]:
    # A separate process, exactly as an operator runs it.
    result = subprocess.run(
        [sys.executable, "-m", "p11grid", "sandbox", action, str(directory)],
        capture_output=True,
        text=True,
        env=_client_environment(),
        timeout=300,
    )
    for line in (result.stdout + result.stderr).splitlines():
        _say(f"    {line}")
    return result


def _print_logs(box: sandbox.Sandbox) -> None:
    error_log = box.directory / "nginx" / "error.log"
    for title, path in (("nginx error log", error_log), ("p11grid log", box.module_log)):
        _say(f"--- {title}: {path} (last lines) ---")
        _say(nginx.tail(path, 25))


def check_grid_audit(audit_log: Path, tally: Tally) -> None:
    """The grid's own record: who signed with which key, and that all went well."""
    import json

    try:
        records = [json.loads(line.split(" ", 2)[2])
                   for line in audit_log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, IndexError) as error:
        tally.check(False, "the grid's audit log is readable", str(error))
        return
    signs = [r for r in records if r.get("op") == "sign"]
    callers = sorted({r.get("caller", "?") for r in signs})
    keys = sorted({r.get("key", "?") for r in signs})
    failed = [r for r in signs if r.get("result") != "ok"]
    tally.check(bool(signs) and not failed,
                f"{audit_log.name}: {len(signs)} signatures made in the grid with "
                f"{', '.join(keys)} for {', '.join(callers)}",
                f"{len(failed)} of {len(signs)} signatures in the grid failed")


def _p11grid(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11grid", *arguments], capture_output=True,
                          text=True, timeout=120)


def check_identity_chain(box: sandbox.Sandbox, variables: dict[str, str], tally: Tally) -> None:
    """What the module checks before its first session, shown check by check."""
    hv = f"spiffe://{sandbox_grid.TRUST_DOMAIN}/hv/{sandbox_identity.HV_NAME}"
    identity = sandbox_identity.IdentityLayout(box.directory / "identity",
                                               sandbox_grid.TRUST_DOMAIN, box.softhsm_conf,
                                               paths.softhsm_library())
    verdict = _p11grid("token", "verify", variables["P11GRID_VM_TOKEN"], "--ca-dir",
                       str(box.directory / "ca"), "--audience", identity.sp, "--cert",
                       str(box.grid.path("vm.pem")), "--issuer", hv)
    for line in verdict.stdout.splitlines():
        if line.startswith("  PASS  "):
            tally.check(True, "VM-Auth-Token " + line[len("  PASS  "):])
        elif line.startswith("  FAIL  "):
            tally.check(False, "VM-Auth-Token " + line[len("  FAIL  "):])
    tally.check(verdict.returncode == 0, f"{variables['P11GRID_VM_TOKEN']}: valid for "
                f"{sandbox_grid.VM_IDENTITY}, signed by {hv} inside its token",
                verdict.stderr.strip() or verdict.stdout.strip().splitlines()[-1:][0]
                if verdict.stdout.strip() else "no verdict")
    tally.check(True, f"OpenID provider {variables['P11GRID_IDP_URL']}: the module "
                "authenticates the hypervisor there with private_key_jwt signed in its token")


def check_authorizations(box: sandbox.Sandbox, tally: Tally) -> None:
    """The grid opened each session only after `authorize` checked the three elements."""
    import json

    records = [json.loads(line.split(" ", 2)[2])
               for line in box.grid.audit_log.read_text().splitlines() if line.strip()]
    granted = [r for r in records if r.get("op") == "authorize" and r.get("result") == "ok"]
    tally.check(bool(granted), f"the grid authorized {len(granted)} session(s) of "
                f"{', '.join(sorted({r['caller'] for r in granted}))} on the three elements "
                "(access token, certificate, VM-Auth-Token)", "no authorize in the audit log")
    log = box.module_log.read_text(errors="replace") if box.module_log.exists() else ""
    verified = [line for line in log.splitlines() if "identity: VM-Auth-Token" in line]
    tally.check(bool(verified), "the module verified its token before its first session: "
                + (verified[-1].split("identity: ", 1)[-1][:110] if verified else ""),
                "no such line in the module log")


def show_refusal(box: sandbox.Sandbox, variables: dict[str, str], tally: Tally) -> None:
    """A token for another VM in place of ours: the next session is refused, with why."""
    identity = sandbox_identity.IdentityLayout(box.directory / "identity",
                                               sandbox_grid.TRUST_DOMAIN, box.softhsm_conf,
                                               paths.softhsm_library())
    token_file = Path(variables["P11GRID_VM_TOKEN"])
    good = token_file.read_text()
    other = box.directory / "demo-vm-2"
    issued = _p11grid("ca", "issue", "--ca-dir", str(box.directory / "ca"), "--kind", "vm",
                      "--name", "vm-2", "--key-out", f"{other}.key", "--out", f"{other}.pem")
    foreign = _p11grid("token", "issue", "vm", "--hv-key", identity.hv_key_uri, "--module",
                       str(paths.softhsm_library()), "--env",
                       f"SOFTHSM2_CONF={identity.hv_softhsm_conf}", "--hv-cert",
                       str(identity.hv_certificate), "--vm-cert", f"{other}.pem",
                       "--audience", identity.sp, "--ttl", "10m")
    if not tally.check(issued.returncode == 0 and foreign.returncode == 0,
                       "a VM-Auth-Token for another VM (vm-2), signed by the same hypervisor",
                       (issued.stderr + foreign.stderr).strip()):
        return
    try:
        token_file.write_text(foreign.stdout)
        # pkcs11-tool prints the CK_RV the module answered (openssl only says it failed).
        refused = subprocess.run(
            ["pkcs11-tool", "--module", variables["P11GRID_MODULE"], "--token-label",
             variables["P11GRID_TOKEN"], "--login", "--pin", variables["P11GRID_PIN"],
             "--list-objects"],
            env={**os.environ, "P11GRID_CONF": variables["P11GRID_CONF"]},
            capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL)
        reasons = [line for line in box.module_log.read_text(errors="replace").splitlines()
                   if "refused by the module" in line]
        tally.check("CKR_TOKEN_NOT_RECOGNIZED" in refused.stdout + refused.stderr
                    and bool(reasons),
                    "with vm-2's token in P11GRID_VM_TOKEN, the next session is refused: "
                    "CKR_TOKEN_NOT_RECOGNIZED", "the session was not refused")
        if reasons:
            reason = reasons[-1].split("refused by the module: ", 1)[-1]
            check, _, detail = reason.partition(":")
            _say(f"    module log: CKR_TOKEN_NOT_RECOGNIZED: the {check} check "
                 f"failed -- {detail.rpartition(' -- ')[2]}")
    finally:
        token_file.write_text(good)
    _say("    (the VM's own token is back in place)")


def run(requests: int, direct: bool, keep: bool) -> int:
    tally = Tally()
    directory = Path(tempfile.mkdtemp(prefix="p11grid-demo-"))
    box = sandbox.Sandbox(directory)
    server: nginx.NginxServer | None = None
    through = "SoftHSM2 directly (--direct)" if direct else f"our module {paths.MODULE_PATH}"
    _say("p11grid demo: nginx serves TLS with keys held in the grid of secure elements")
    _say(f"  keys reached through {through}")
    try:
        _say("\n[1/7] p11grid sandbox up")
        created = _run_sandbox_command("up", directory)
        if not tally.check(created.returncode == 0, f"sandbox ready in {directory}",
                           "p11grid sandbox up failed (see above)"):  # fmt: skip
            return 1
        variables = box.env()
        openssl_conf = box.direct_openssl_conf if direct else box.openssl_conf
        if not direct and not paths.MODULE_PATH.exists():
            tally.check(False, f"{paths.MODULE_PATH} exists", "not built: run `make install`")
            return 1

        if not direct:
            _say("\n[2/7] the identity chain: what the module checks before its first session")
            check_identity_chain(box, variables, tally)

        _say("\n[3/7] OpenSSL CLI signs through the libp11 engine")
        check_openssl_signing(box, variables, openssl_conf, tally)

        _say("\n[4/7] OpenSSL 3 signs through pkcs11-provider (Debian 13 on)")
        check_provider_signing(box, variables, direct, tally)

        _say("\n[5/7] nginx: 2 workers, one HTTPS port per key")
        try:
            server = nginx.start(directory, openssl_conf=openssl_conf)
        except nginx.NginxError as error:
            tally.check(False, "nginx started", str(error).splitlines()[0])
            return 1
        tally.check(
            True,
            f"nginx started (master pid {server.pid}): "
            + ", ".join(f"{label} on {server.url(label)}" for label in server.ports),
        )

        _say(f"\n[6/7] curl --cacert {box.ca_cert.name}: {requests} requests per key and version")
        workers = server.worker_pids()
        check_tls(server, box.ca_cert, requests, tally)
        if not direct:
            check_module_in_nginx(server, workers, box.module_log, tally)
            check_grid_audit(box.grid.audit_log, tally)
            check_authorizations(box, tally)
            _say("\n[7/7] a refusal: another VM's token in place of ours")
            show_refusal(box, variables, tally)
        return 0 if not tally.failures else 1
    except Exception as error:  # nginx and the sandbox are still cleaned up below
        tally.check(False, "the demo ran to its end", f"{type(error).__name__}: {error}")
        return 1
    except KeyboardInterrupt:
        tally.check(False, "the demo ran to its end", "interrupted")
        return 130
    finally:
        if tally.failures:
            _say()
            _print_logs(box)
        _say("\n[end] stopping")
        if server is not None:
            status = nginx.stop(server)
            _say(f"  nginx stopped (exit status {status})")
        if keep:
            _say(f"  kept the sandbox: p11grid sandbox down {directory}")
        else:
            _run_sandbox_command("down", directory)
        if tally.failures:
            _say(f"\nFAILED: {len(tally.failures)} of {tally.passed + len(tally.failures)} "
                 "checks failed:")  # fmt: skip
            for reason in tally.failures:
                _say(f"  {FAILED} {reason}")
        else:
            _say(f"\nOK: all {tally.passed} checks passed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p11grid.demo", description=__doc__)
    parser.add_argument("--requests", type=int, default=3, help="requests per key and version")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="put the engine on SoftHSM2 directly instead of our module (tells faults apart)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the sandbox for inspection")
    arguments = parser.parse_args(argv)
    return run(arguments.requests, arguments.direct, arguments.keep)


if __name__ == "__main__":
    sys.exit(main())
