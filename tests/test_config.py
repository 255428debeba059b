"""The module configuration: every mistake is named, none is guessed around."""

from __future__ import annotations

from pathlib import Path

import pytest

from provider.config import load, parse
from provider.return_values import ConfigError

GOOD = """
[module]
backend = "local"
log_file = "/var/log/p11grid.log"

[[secure_element]]
label = "vm-se"
library = "/usr/lib/softhsm/libsofthsm2.so"
[secure_element.environment]
SOFTHSM2_CONF = "/etc/softhsm2.conf"
"""


def test_good_config_and_defaults() -> None:
    config = parse(GOOD, Path("/x.toml"))
    element = config.secure_elements[0]
    assert (config.backend, config.log_level) == ("local", "info")
    assert (element.driver, element.token_label) == ("pkcs11", "vm-se")
    assert element.environment == {"SOFTHSM2_CONF": "/etc/softhsm2.conf"}
    assert element.mechanisms is None
    restricted = parse(GOOD.replace("[secure_element.environment]",
                                    'mechanisms = ["RSA_X_509", "ECDSA"]\n'
                                    "[secure_element.environment]"), Path("/x.toml"))
    assert restricted.secure_elements[0].mechanisms == {0x3, 0x1041}


@pytest.mark.parametrize(("text", "says"), [
    ("[module\n", "not valid TOML"),
    ("[module]\nbackend = \"cloud\"\n[[secure_element]]\nlabel=\"a\"\nlibrary=\"/a\"\n",
     "backend must be one of"),
    (GOOD.replace("[module]", "[module]\ncolour = 1"), "unknown key(s) colour"),
    ("[module]\n", "at least one [[secure_element]]"),
    (GOOD.replace('"/usr/lib/softhsm/libsofthsm2.so"', '"libsofthsm2.so"'), "absolute path"),
    (GOOD.replace('label = "vm-se"', 'label = "' + "x" * 33 + '"'), "longer than 32 bytes"),
    (GOOD + '[[secure_element]]\nlabel = "vm-se"\nlibrary = "/a"\n',
     "labels must be unique"),
    (GOOD.replace('log_file = "/var/log/p11grid.log"', 'log_file = "p11grid.log"'),
     "log_file must be an absolute path"),
    (GOOD.replace("[secure_element.environment]",
                  'mechanisms = ["RSA_X_509", "RSA_MAGIC"]\n[secure_element.environment]'),
     "unknown mechanism(s) RSA_MAGIC"),
])
def test_mistakes_are_named(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(text, Path("/x.toml"))
    assert says in str(error.value)


def test_path_comes_from_environment_and_must_be_absolute(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P11GRID_CONF", "relative.toml")
    with pytest.raises(ConfigError, match="absolute"):
        load()
    monkeypatch.setenv("P11GRID_CONF", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="no module config"):
        load()
    (tmp_path / "ok.toml").write_text(GOOD)
    monkeypatch.setenv("P11GRID_CONF", str(tmp_path / "ok.toml"))
    assert load().path == tmp_path / "ok.toml"


GRID = """
[module]
backend = "grid"

[grid]
endpoints = ["127.0.0.1:7443"]
ca = "/etc/p11grid/ca.pem"
certificate = "/etc/p11grid/vm.pem"
key = "/etc/p11grid/vm.key"
"""


def test_grid_defaults_and_discovery() -> None:
    config = parse(GRID, Path("/x.toml"))
    assert config.secure_elements == ()  # the grid will be asked for them
    assert config.grid is not None
    assert (config.grid.timeout, config.grid.spin_us) == (5.0, 1000)
    quiet = parse(GRID.replace('key = "/etc/p11grid/vm.key"',
                               'key = "/etc/p11grid/vm.key"\nspin_us = 0'), Path("/x.toml"))
    assert quiet.grid is not None and quiet.grid.spin_us == 0


@pytest.mark.parametrize("value", ["-1", "5001", "1.5", "true", '"fast"'])
def test_grid_spin_must_be_bounded_microseconds(value: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(GRID.replace('key = "/etc/p11grid/vm.key"',
                           f'key = "/etc/p11grid/vm.key"\nspin_us = {value}'), Path("/x.toml"))
    assert "spin_us must be an integer of microseconds in [0, 5000]" in str(error.value)


IDENTITY = GRID + """
[identity]
audience = "spiffe://p11grid.test/sp/grid"
ca = "/etc/p11grid/iam-ca.pem"
idp = "https://127.0.0.1:8443"
hv_certificate = "/etc/p11grid/hv.pem"
vm_token = "/etc/p11grid/vm-token.jwt"
hv_key = "pkcs11:token=hv-se;object=hv-key"
hv_module = "/usr/lib/softhsm/libsofthsm2.so"
"""


def test_identity_table() -> None:
    config = parse(IDENTITY, Path("/x.toml"))
    assert config.identity is not None
    assert (config.identity.vm_token, config.identity.vm) == ("/etc/p11grid/vm-token.jwt", None)
    assert config.identity.max_token_lifetime == 86400.0


@pytest.mark.parametrize(("change", "says"), [
    (('vm_token = "/etc/p11grid/vm-token.jwt"', ""), "give vm_token"),
    (('vm_token = "/etc/p11grid/vm-token.jwt"',
      'vm_token = "/etc/p11grid/vm-token.jwt"\nvm = "spiffe://p11grid.test/vm/vm-1"'),
     "give vm_token"),
    (('hv_module = "/usr/lib/softhsm/libsofthsm2.so"', ""), "hv_key needs hv_module"),
    (('idp = "https://127.0.0.1:8443"', 'idp = "http://127.0.0.1:8443"'), "https://"),
    (('audience = "spiffe://p11grid.test/sp/grid"', 'audience = "grid"'), "spiffe://"),
    (('ca = "/etc/p11grid/iam-ca.pem"', 'ca = "iam-ca.pem"'), "ca must be an absolute path"),
    (('hv_module', 'hv_modul'), "unknown key(s) hv_modul"),
])
def test_identity_mistakes_are_named(change: tuple[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(IDENTITY.replace(*change), Path("/x.toml"))
    assert says in str(error.value)


def test_identity_needs_the_grid_backend() -> None:
    with pytest.raises(ConfigError, match="needs backend"):
        parse(GOOD + IDENTITY[IDENTITY.index("[identity]"):], Path("/x.toml"))
