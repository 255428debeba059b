"""The identity gate of the PKCS#11 module: the tokens it presents before a session on a
grid element opens (DESIGN.md section 3).

For each authorization the grid asks for, the gate
1. takes the VM-Auth-Token: Option 2, a file given to the VM at transfer (read again each
   time, so a replaced file takes effect at the next session); Option 1, handed out by the
   OpenID provider, which the platform administrator recorded it with;
2. verifies it here first (chain to the IAM root, signature, audience, lifetime, expiry,
   `cnf` = this VM's certificate, signed by the configured hypervisor), so that a bad token
   is refused with a precise reason before anything leaves the VM;
3. authenticates to the OpenID provider with the hypervisor's key (private_key_jwt signed
   inside its secure element, or tls_client_auth) and exchanges the VM token for an access
   token for the grid SP. An access token opens one authorization at the grid, so each
   call gets a fresh one.
After a fork the child starts over: the parent's signer and connections are not touched.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from idm.chain import TrustAnchor
from idm.identity import Identity, identity_of
from idm.tokens import DEFAULT_MAX_LIFETIME, Expectations, TokenReport, verify_token

log = logging.getLogger("p11grid.identity")

# What an operator should do when the module refuses its own VM-Auth-Token, by check.
FIXES = {
    "format": "the file does not hold a VM-Auth-Token (a compact JWS)",
    "typ": "the file holds another kind of token, not a VM-Auth-Token",
    "chain": "the signer's certificate does not chain to the IAM root in [identity] ca, or "
             "it expired or was revoked: have the hypervisor's certificate reissued",
    "signature": "the token was altered, or signed by another key than its certificate's",
    "claims": "the token lacks claims a VM-Auth-Token carries: issue it again with "
              "`p11grid token issue vm`",
    "issuer": "its iss is not the hypervisor whose key signed it",
    "authenticated issuer": "it was signed by another hypervisor than [identity] "
                            "hv_certificate names",
    "subject": "its sub is not a VM of this trust domain",
    "audience": "it was issued for another grid SP than [identity] audience",
    "expiry": "it expired: have the hypervisor issue a new one (`p11grid token issue vm`)",
    "not before": "it is not valid yet: check this VM's clock",
    "lifetime": "its lifetime exceeds [identity] max_token_lifetime",
    "confirmation": "it was issued for another VM certificate than [grid] certificate",
}


class GateRefused(Exception):
    """The module's own checks refuse to go on; the message says what to fix."""


class ResultRefused(Exception):
    """A result container from the grid did not open or verify: nothing is returned."""


@dataclass(frozen=True)
class GateSettings:
    audience: str  # the grid SP's identity
    ca: Path  # the IAM root certificate
    crl: Path | None
    certificate: Path  # this VM's certificate: the one the grid sees in TLS
    idp: str  # the OpenID provider's issuer URL
    hv_certificate: Path
    vm_token: Path | None = None  # Option 2
    vm: str | None = None  # Option 1: this VM's identity; the provider hands the token out
    hv_key: str | None = None  # private_key_jwt: PKCS#11 URI of the hypervisor's key
    hv_module: Path | None = None
    hv_environment: dict[str, str] = field(default_factory=dict)
    hv_key_file: Path | None = None  # tls_client_auth: the hypervisor's key file
    max_token_lifetime: datetime.timedelta = DEFAULT_MAX_LIFETIME
    timeout: float = 5.0
    result_authority: Path | None = None  # the grid's authority key (PEM public key or cert)
    # An APP one layer up: its APP-Auth-Token, and the VM's certificate and key file with
    # which the VM authenticates to the provider (tls_client_auth) to vouch for it.
    app_token: Path | None = None
    vm_certificate: Path | None = None
    vm_key_file: Path | None = None


class IdentityGate:
    def __init__(self, settings: GateSettings) -> None:
        if (settings.vm_token is None) == (settings.vm is None):
            raise GateRefused("[identity] needs exactly one of vm_token (a token file, "
                              "Option 2) or vm (the provider hands the token out, Option 1)")
        if settings.app_token is not None and (settings.vm_certificate is None
                                               or settings.vm_key_file is None):
            raise GateRefused("[identity] app_token needs vm_certificate and vm_key_file (the "
                              "VM authenticates to the provider to vouch for the APP)")
        if (settings.hv_key is None) == (settings.hv_key_file is None):
            raise GateRefused("[identity] needs exactly one of hv_key (a PKCS#11 URI: "
                              "private_key_jwt) or hv_key_file (tls_client_auth)")
        self.settings = settings
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._auth: Any = None
        self._idp: Any = None
        self._signer: Any = None

    def _forked(self) -> None:
        if self._pid != os.getpid():  # the parent's signer and sessions are not ours
            self._pid, self._auth, self._idp, self._signer = os.getpid(), None, None, None

    def credentials(self) -> dict[str, str]:
        """Fresh tokens for one `authorize` at the grid: access_token and vm_token.

        Holds the gate's lock across its requests to the provider: threads that need
        tokens at the same moment wait for one exchange rather than each making one."""
        from idm.idp_client import (
            TlsClientAuth,
            exchange_app_token,
            exchange_vm_token,
            fetch_recorded,
        )

        with self._lock:
            self._forked()
            settings = self.settings
            idp, auth = self._connection()
            # The VM token's cnf names the VM's certificate: ours, unless we are an APP.
            vm_certificate = settings.vm_certificate or settings.certificate
            if settings.vm_token is not None:
                token = self._read_token(settings.vm_token)
                report = self._check(token, str(settings.vm_token), "vm", vm_certificate)
                issued = exchange_vm_token(idp, auth, token, settings.audience)
            else:
                issued = fetch_recorded(idp, auth, str(settings.vm), settings.audience)
                token = str(issued.vm_auth_token)
                report = self._check(token, f"the VM-Auth-Token the provider recorded for "
                                            f"{settings.vm}", "vm", vm_certificate)
            log.info("identity: VM-Auth-Token of %s verified (%s); access token for %s from "
                     "%s, valid %.0f s", report.subject, ", ".join(c.name for c in report.checks),
                     settings.audience, settings.idp, issued.expires_at - time.time())
            if settings.app_token is None:
                return {"access_token": issued.access_token, "vm_token": token}
            app_token = self._read_token(settings.app_token)
            app_report = self._check(app_token, str(settings.app_token), "app",
                                     settings.certificate, vm_report=report)
            assert settings.vm_certificate is not None and settings.vm_key_file is not None
            vm_auth = TlsClientAuth.from_files(settings.vm_certificate, settings.vm_key_file)
            app_issued = exchange_app_token(idp, vm_auth, app_token, issued.access_token, token,
                                            settings.audience)
            log.info("identity: APP-Auth-Token of %s verified, vouched for by %s; access token "
                     "valid %.0f s", app_report.subject, report.subject,
                     app_issued.expires_at - time.time())
            return {"access_token": app_issued.access_token, "vm_token": token,
                    "app_token": app_token}

    def open_result(self, authorization: str, operation: str, data: bytes,
                    container: bytes) -> bytes:
        """A sealed result: the trailer verified with the grid's authority key, then the
        key unwrapped by the hypervisor's key, then the body decrypted."""
        from idm.container import ContainerRefused, SoftwareUnwrapper, result_context, unpack

        settings = self.settings
        unwrapper: Any = self._signer if self._pid == os.getpid() else None
        if unwrapper is None:
            # Only to make the unwrapper: a signature must not wait behind a token exchange
            # (credentials() holds the lock across its requests to the provider).
            with self._lock:
                self._forked()
                if settings.hv_key_file is not None:
                    from cryptography.hazmat.primitives import serialization

                    key = serialization.load_pem_private_key(
                        settings.hv_key_file.read_bytes(), None)
                    unwrapper = SoftwareUnwrapper(key)  # type: ignore[arg-type]
                else:
                    unwrapper = self._signer or self._hv_signer()
        try:
            return unpack(container, unwrapper, self._authority_key(),
                          result_context(authorization, operation, data))
        except ContainerRefused as exc:
            raise ResultRefused(f"the grid's {operation} result was refused: {exc}") from None

    def _authority_key(self) -> Any:
        path = self.settings.result_authority
        if path is None:
            raise ResultRefused("a sealed result arrived but [identity] result_authority is "
                                "not set")
        data = path.read_bytes()
        if b"CERTIFICATE" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        from cryptography.hazmat.primitives import serialization

        return serialization.load_pem_public_key(data)

    def check_vm_token(self) -> TokenReport:
        """The Option 2 token file checked as `credentials()` checks it, without asking
        anyone (for `p11grid status`); GateRefused with the reason and what to do."""
        if self.settings.vm_token is None:
            raise GateRefused("no vm_token file: the provider hands the token out (Option 1)")
        return self._check(self._read_token(self.settings.vm_token),
                           str(self.settings.vm_token), "vm",
                           self.settings.vm_certificate or self.settings.certificate)

    @staticmethod
    def _read_token(path: Path) -> str:
        try:
            return path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise GateRefused(f"cannot read the VM-Auth-Token file {path}: {exc}") from None

    def _check(self, token: str, where: str, kind: str, presented: Path,
               vm_report: TokenReport | None = None) -> TokenReport:
        """The token checked here, before anything leaves: a VM token signed by the
        configured hypervisor, or an APP token signed by the VM of `vm_report`."""
        settings = self.settings
        try:
            certificate = x509.load_pem_x509_certificate(presented.read_bytes())
            signer_file = settings.hv_certificate if kind == "vm" else settings.vm_certificate
            assert signer_file is not None
            signer = x509.load_pem_x509_certificate(signer_file.read_bytes())
            anchor = TrustAnchor.load(settings.ca, settings.crl)
        except (OSError, ValueError) as exc:
            raise GateRefused(f"[identity]: cannot load a certificate or the IAM root: {exc}"
                              ) from None
        report = verify_token(token, kind, Expectations(
            anchor=anchor, audience=settings.audience,
            max_lifetime=settings.max_token_lifetime, presented_certificate=certificate,
            authenticated_issuer=identity_of(signer), vm_token=vm_report))
        reason = report.refusal()
        if reason is not None:
            check = reason.split(":", 1)[0]
            fix = FIXES.get(check, "")
            raise GateRefused(f"{where} refused by the module: {reason}"
                              + (f" -- {fix}" if fix else ""))
        return report

    def _connection(self) -> tuple[Any, Any]:
        from idm.idp_client import IdpConnection, JwtClientAuth, TlsClientAuth

        settings = self.settings
        if self._idp is None:
            self._idp = IdpConnection.discover(settings.idp, settings.ca, settings.timeout)
        if self._auth is None:
            if settings.hv_key_file is not None:
                self._auth = TlsClientAuth.from_files(settings.hv_certificate,
                                                      settings.hv_key_file)
            else:
                self._auth = JwtClientAuth.from_certificates(
                    self._hv_signer(), [x509.load_pem_x509_certificate(
                        settings.hv_certificate.read_bytes())])
        return self._idp, self._auth

    def _hv_signer(self) -> Any:
        from idm.pkcs11_signer import Pkcs11Signer
        from idm.pkcs11_uri import parse_pkcs11_uri, resolve_pin

        settings = self.settings
        if settings.hv_module is None or settings.hv_key is None:
            raise GateRefused("[identity] hv_key needs hv_module (the PKCS#11 library that "
                              "holds the hypervisor's key)")
        uri = parse_pkcs11_uri(settings.hv_key)
        self._signer = Pkcs11Signer(settings.hv_module, uri, resolve_pin(uri, None),
                                    settings.hv_environment)
        return self._signer


def subject_of(settings: GateSettings) -> Identity:
    """The VM this gate speaks for (from its certificate)."""
    return identity_of(x509.load_pem_x509_certificate(settings.certificate.read_bytes()))


Authorizer = Callable[[], dict[str, str]]
