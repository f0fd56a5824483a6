"""edge_relay.keys: subkey derivation, the key ring, key files.

Vectors: tests/vectors/keys.json (written by tests/vectors/generate.py), and
RFC 5869 appendix A (https://www.rfc-editor.org/rfc/rfc5869#appendix-A) for
the HKDF-Expand step itself.
"""

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import pytest

from edge_relay import keys
from edge_relay.errors import EdgeRelayError, KeyFileError

VECTORS = json.loads((Path(__file__).parent / "vectors" / "keys.json").read_text())
KEYS = VECTORS["keys"]
MASTERS = {v["key_id"]: bytes.fromhex(v["master"]) for v in KEYS}


def hkdf_expand(prk, info, length):
    """RFC 5869 section 2.3, written out: T(i) = HMAC(PRK, T(i-1) || info || i)."""
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def one_line(exc):
    return "\n" not in str(exc) and str(exc)


# -- derivation ------------------------------------------------------------------------


@pytest.mark.parametrize("vec", KEYS, ids=lambda v: v["name"])
def test_derivation_vectors(vec):
    key = keys.Key(vec["key_id"], bytes.fromhex(vec["master"]))
    assert key.token_key.hex() == vec["token_key"]
    assert key.header_key.hex() == vec["header_key"]


@pytest.mark.parametrize("vec", KEYS, ids=lambda v: v["name"])
def test_derivation_from_the_spec(vec):
    """HKDF-Expand(PRK = master, info = label, L = 32), independent of keys.derive."""
    master = bytes.fromhex(vec["master"])
    assert hkdf_expand(master, b"edge-relay v1 token", 32).hex() == vec["token_key"]
    assert hkdf_expand(master, b"edge-relay v1 header", 32).hex() == vec["header_key"]


def test_labels():
    assert keys.LABEL_TOKEN == VECTORS["labels"]["token"]["ascii"].encode()
    assert keys.LABEL_HEADER == VECTORS["labels"]["header"]["ascii"].encode()
    assert VECTORS["labels"]["token"]["hmac_input"] == (keys.LABEL_TOKEN + b"\x01").hex()
    assert VECTORS["labels"]["header"]["hmac_input"] == (keys.LABEL_HEADER + b"\x01").hex()


@pytest.mark.parametrize("prk, info, okm", [
    # RFC 5869 A.1 (PRK and the first 32 octets of OKM)
    ("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5", "f0f1f2f3f4f5f6f7f8f9",
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"),
    # RFC 5869 A.3 (empty info)
    ("19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04", "",
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"),
])
def test_derive_is_rfc5869_expand(prk, info, okm):
    assert keys.derive(bytes.fromhex(prk), bytes.fromhex(info)).hex() == okm
    assert hkdf_expand(bytes.fromhex(prk), bytes.fromhex(info), 32).hex() == okm


def test_purposes_are_separated():
    key = keys.Key(1, MASTERS[1])
    assert len({key.token_key, key.header_key, MASTERS[1]}) == 3


def test_prekeyed_states_match_fresh_hmac():
    key = keys.Key(2, MASTERS[2])
    for state, subkey in ((key.token_mac, key.token_key), (key.header_mac, key.header_key)):
        mac = state.copy()
        mac.update(b"abc")
        assert mac.digest() == hmac.new(subkey, b"abc", hashlib.sha256).digest()
    # copying never consumes the keyed state
    assert key.token_mac.copy().digest() == hmac.new(key.token_key, b"", hashlib.sha256).digest()


@pytest.mark.parametrize("key_id, master", [(-1, bytes(32)), (256, bytes(32)), (1, bytes(31)), (1, bytes(33))])
def test_key_rejects_bad_id_or_length(key_id, master):
    with pytest.raises(ValueError):
        keys.Key(key_id, master)


# -- key ring --------------------------------------------------------------------------


def test_ring_signing_defaults_to_lowest():
    """Installing a new, higher key must not change what a host signs with."""
    assert keys.KeyRing(MASTERS).signing.key_id == 1
    ring = keys.KeyRing(MASTERS, signing_key_id=VECTORS["ring"]["signing_key_id"])
    assert ring.signing.key_id == 2
    assert ring.ids == tuple(VECTORS["ring"]["key_ids"]) == (1, 2)
    assert len(ring.by_id) == 256
    assert [i for i, k in enumerate(ring.by_id) if k is not None] == [1, 2]


def test_ring_signing_explicit():
    ring = keys.KeyRing(MASTERS, signing_key_id=1)
    assert ring.signing.key_id == 1
    assert ring.get(2).key_id == 2           # still accepted


@pytest.mark.parametrize("signing", [0, 3, 255])
def test_ring_signing_unknown(signing):
    with pytest.raises(KeyFileError) as err:
        keys.KeyRing(MASTERS, signing_key_id=signing)
    assert one_line(err.value) and str(signing) in str(err.value)


@pytest.mark.parametrize("signing", [-1, 256])
def test_ring_signing_out_of_range(signing):
    """Regression: by_id[-1] once chose key 255, and 256 raised IndexError."""
    with pytest.raises(KeyFileError):
        keys.KeyRing({1: MASTERS[1], 255: MASTERS[2]}, signing_key_id=signing)


def test_ring_empty():
    with pytest.raises(KeyFileError) as err:
        keys.KeyRing({})
    assert one_line(err.value)


def test_ring_get():
    ring = keys.KeyRing(MASTERS)
    assert ring.get(1).key_id == 1
    assert ring.get(0) is None
    assert ring.get(-1) is None
    assert ring.get(256) is None


def test_key_file_error_is_an_operator_error():
    assert issubclass(KeyFileError, EdgeRelayError)


# -- key files -------------------------------------------------------------------------


def put(directory, name, content, mode=0o640):
    path = Path(directory) / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.chmod(path, mode)
    return path


@pytest.fixture
def keydir(tmp_path):
    for vec in KEYS:
        put(tmp_path, vec["file_name"], vec["file_content"])
    return tmp_path


def test_load_dir(keydir):
    ring = keys.load_dir(keydir)
    assert ring.ids == (1, 2)
    assert ring.signing.key_id == 1
    for vec in KEYS:
        assert ring.get(vec["key_id"]).token_key.hex() == vec["token_key"]
        assert ring.get(vec["key_id"]).header_key.hex() == vec["header_key"]
    assert keys.load_dir(keydir, signing_key_id=1).signing.key_id == 1


def test_load_dir_ignores_other_files(keydir):
    put(keydir, "README", "not a key")
    put(keydir, "1.key~", "editor backup")
    put(keydir, "2.key.bak", "old", mode=0o666)
    assert keys.load_dir(keydir).ids == (1, 2)


@pytest.mark.parametrize("content", [
    MASTERS[1].hex(), MASTERS[1].hex() + "\n", MASTERS[1].hex() + "\r\n", MASTERS[1].hex().upper() + "\n",
])
def test_read_key_file_formats(tmp_path, content):
    assert keys.read_key_file(put(tmp_path, "1.key", content)) == MASTERS[1]


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o601, 0o666])
def test_load_dir_refuses_file_others_can_access(keydir, mode):
    os.chmod(keydir / "2.key", mode)
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(keydir)
    assert one_line(err.value)
    assert str(keydir / "2.key") in str(err.value)
    assert "chmod" in str(err.value)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400, 0o440])
def test_group_and_owner_modes_are_fine(tmp_path, mode):
    assert keys.read_key_file(put(tmp_path, "1.key", MASTERS[1].hex(), mode)) == MASTERS[1]


@pytest.mark.parametrize("mode", [0o660, 0o620, 0o670])
def test_load_dir_refuses_a_key_its_group_may_write(keydir, mode):
    """0660: every process of the service group could replace the key (issue 13, item 5)."""
    os.chmod(keydir / "2.key", mode)
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(keydir)
    assert one_line(err.value) and str(keydir / "2.key") in str(err.value)
    assert "writable by its group" in str(err.value) and "chmod g-w" in str(err.value)


@pytest.mark.parametrize("mode,who", [(0o777, "others"), (0o1777, "others"), (0o770, "its group"),
                                      (0o757, "others")])
def test_load_dir_refuses_a_directory_others_may_write(keydir, mode, who):
    os.chmod(keydir, mode)
    try:
        with pytest.raises(KeyFileError) as err:
            keys.load_dir(keydir)
    finally:
        os.chmod(keydir, 0o700)
    assert one_line(err.value) and str(err.value).startswith(f"{keydir}: key directory is writable by {who}")
    for fine in (0o750, 0o700, 0o755, 0o550):
        os.chmod(keydir, fine)
        assert keys.load_dir(keydir).ids
    os.chmod(keydir, 0o700)


@pytest.mark.parametrize("content", [
    MASTERS[1].hex()[:-2],              # 31 octets
    MASTERS[1].hex() + "00",            # 33 octets
    "",                                 # empty
    "zz" * 32,                          # not hex
    MASTERS[1].hex()[:-1],              # odd number of digits
    MASTERS[1].hex()[:32] + " " + MASTERS[1].hex()[32:],
])
def test_load_dir_refuses_wrong_length_or_format(keydir, content):
    put(keydir, "2.key", content)
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(keydir)
    assert one_line(err.value)
    assert str(keydir / "2.key") in str(err.value)


@pytest.mark.parametrize("name", ["x.key", "01.key", "256.key", "-1.key", ".key", "1 .key", "0x1.key"])
def test_load_dir_refuses_bad_name(keydir, name):
    put(keydir, name, MASTERS[1].hex())
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(keydir)
    assert one_line(err.value)
    assert str(keydir / name) in str(err.value)


@pytest.mark.parametrize("name", ["0.key", "9.key", "10.key", "255.key"])
def test_key_id_of_accepts(name):
    assert keys.key_id_of(name) == int(name.split(".")[0])


@pytest.mark.parametrize("name", ["\u00b2.key", "\u0661.key", "\uff11.key"], ids=["superscript", "arabic", "fullwidth"])
def test_load_dir_refuses_non_ascii_digit_names(keydir, name):
    """Regression: str.isdigit() let '\u00b2.key' crash int() and '\u0661.key' stand in for key 1."""
    assert keys.key_id_of(name) is None
    put(keydir, name, "ff" * 32, mode=0o600)
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(keydir)
    assert one_line(err.value) and str(keydir / name) in str(err.value)


def test_load_dir_refuses_symlink(keydir, tmp_path_factory):
    target = put(tmp_path_factory.mktemp("elsewhere"), "k", MASTERS[1].hex(), 0o600)
    (keydir / "3.key").symlink_to(target)
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(keydir)
    assert one_line(err.value) and str(keydir / "3.key") in str(err.value)
    assert "symlinks are refused" in str(err.value) and "Too many levels" not in str(err.value)


def test_load_dir_refuses_a_fifo_named_like_a_key_without_hanging(keydir):
    """Opened non-blocking: a FIFO would otherwise block open() until a writer came."""
    os.mkfifo(keydir / "3.key", 0o600)
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(keydir)
    assert one_line(err.value) and str(err.value) == f"{keydir / '3.key'}: not a regular file"


def test_load_dir_refuses_directory_named_like_a_key(keydir):
    (keydir / "3.key").mkdir()
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(keydir)
    assert one_line(err.value) and str(keydir / "3.key") in str(err.value)


def test_load_dir_empty_and_missing(tmp_path):
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(tmp_path)
    assert one_line(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(tmp_path / "missing")
    assert one_line(err.value) and str(tmp_path / "missing") in str(err.value)


def test_load_dir_unknown_signing_id(keydir):
    with pytest.raises(KeyFileError) as err:
        keys.load_dir(keydir, signing_key_id=7)
    assert one_line(err.value)


# -- writing key files -----------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o077, 0o000, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_write_key_file_mode_0640(tmp_path, umask):
    path = keys.write_key_file(tmp_path, 1, MASTERS[1])
    assert path == tmp_path / "1.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert path.read_text() == KEYS[0]["file_content"]
    assert keys.read_key_file(path) == MASTERS[1]


def test_write_key_file_never_overwrites(tmp_path):
    path = keys.write_key_file(tmp_path, 2, MASTERS[2])
    with pytest.raises(KeyFileError) as err:
        keys.write_key_file(tmp_path, 2, MASTERS[1])
    assert one_line(err.value) and str(path) in str(err.value)
    assert keys.read_key_file(path) == MASTERS[2]


def test_write_key_file_picks_next_id(tmp_path):
    assert keys.write_key_file(tmp_path).name == "1.key"
    assert keys.write_key_file(tmp_path).name == "2.key"
    keys.write_key_file(tmp_path, 9)
    assert keys.write_key_file(tmp_path).name == "10.key"
    ring = keys.load_dir(tmp_path)
    assert ring.ids == (1, 2, 9, 10) and ring.signing.key_id == 1


def test_write_key_file_random_and_loadable(tmp_path):
    a = keys.read_key_file(keys.write_key_file(tmp_path))
    b = keys.read_key_file(keys.write_key_file(tmp_path))
    assert len(a) == len(b) == 32 and a != b


def test_write_key_file_full_range(tmp_path):
    keys.write_key_file(tmp_path, 255)
    with pytest.raises(KeyFileError) as err:
        keys.write_key_file(tmp_path)
    assert one_line(err.value)


@pytest.mark.parametrize("key_id", [-1, 256])
def test_write_key_file_bad_id(tmp_path, key_id):
    with pytest.raises(KeyFileError) as err:
        keys.write_key_file(tmp_path, key_id)
    assert one_line(err.value)


def test_write_key_file_missing_directory(tmp_path):
    with pytest.raises(KeyFileError) as err:
        keys.write_key_file(tmp_path / "missing", 1)
    assert one_line(err.value) and str(tmp_path / "missing") in str(err.value)


def test_write_key_file_group(tmp_path):
    path = keys.write_key_file(tmp_path, 1, group=os.getgid())
    assert os.stat(path).st_gid == os.getgid()


def test_write_key_file_group_refused_leaves_no_file(tmp_path, monkeypatch):
    def fchown(fd, uid, gid):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "fchown", fchown)
    with pytest.raises(KeyFileError) as err:
        keys.write_key_file(tmp_path, 1, group=12345)
    assert one_line(err.value) and "Operation not permitted" in str(err.value)
    assert not (tmp_path / "1.key").exists()


@pytest.mark.parametrize("master", [b"short", bytes(31), bytes(33)], ids=["5", "31", "33"])
def test_write_key_file_refuses_wrong_length_master(tmp_path, master):
    """Regression: a wrong-length master was written, and load_dir refused the file later."""
    with pytest.raises(ValueError):
        keys.write_key_file(tmp_path, 1, master)
    assert not (tmp_path / "1.key").exists()


def test_keyed_hmac_is_the_c_object_when_openssl_is_there_and_matches_hmac_new():
    import _hashlib
    state = keys.keyed_hmac(b"k" * 32)
    assert type(state) is _hashlib.HMAC
    key = keys.Key(2, MASTERS[2])
    assert type(key.header_openssl_mac) is _hashlib.HMAC
    for msg in (b"", b"abc", bytes(range(256)) * 9):
        mac = state.copy()
        mac.update(memoryview(msg))
        assert mac.digest() == hmac.new(b"k" * 32, msg, hashlib.sha256).digest()
        mac = key.header_openssl_mac.copy()
        mac.update(msg)
        assert mac.digest() == hmac.new(key.header_key, msg, hashlib.sha256).digest()


def test_keyed_hmac_without_openssl_falls_back_to_hmac(monkeypatch):
    monkeypatch.setattr(keys, "_hashlib", None)
    state = keys.keyed_hmac(b"k" * 32)
    assert isinstance(state, hmac.HMAC)
    mac = state.copy()
    mac.update(b"abc")
    assert mac.digest() == hmac.new(b"k" * 32, b"abc", hashlib.sha256).digest()
    key = keys.Key(2, MASTERS[2])
    assert isinstance(key.header_openssl_mac, hmac.HMAC)
    assert key.header_openssl_mac.copy().digest() == key.header_mac.copy().digest()
