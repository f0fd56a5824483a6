"""Key ring: master keys by key id, and the per-purpose subkeys derived from them.

Contract
  * A master key is 32 random bytes, identified by a key id 0..255, stored in
    a file `<key id>.key` as 64 hex digits (a trailing newline is allowed).
  * Nothing uses a master key directly. Each purpose gets its own subkey,
    HKDF-Expand (RFC 5869 section 2.3) with SHA-256, PRK = master key,
    info = the purpose label, L = 32, i.e. HMAC-SHA256(master, label || 0x01).
    A leaked token key therefore cannot forge headers, and vice versa.
  * Several key ids are accepted at once; exactly one signs. Rotation adds a
    new key everywhere first, then moves the signing id, then removes the old.
  * Loading refuses, with a KeyFileError naming the file, any key file that
    others may read or write or that its group may write (0640 is the mode;
    0660 would let every process of the service group replace a key), a
    symlink, anything not exactly 32 bytes of hex, a name that is not a key
    id, and a key directory that group or others may write (they could add
    or swap keys).

Each Key keeps pre-keyed HMAC states: `copy()` of a keyed state skips the
two key-block compressions that a fresh `hmac.new` pays on every packet.
`token_mac` and `header_mac` are `hmac.HMAC` objects; `header_openssl_mac`
is the same keyed HMAC state as OpenSSL's own HMAC object (`_hashlib.HMAC`)
when Python has one, which the per-packet paths use: same `copy`, `update`,
`digest` and digests, ~300 ns less per packet, since the `hmac.HMAC` wrapper
adds a Python-level call to each of those methods. Without OpenSSL
`header_openssl_mac` is `header_mac`. `header_split` is the same HMAC as two pre-keyed SHA-256
states (inner, outer; see split_hmac), cheaper still per packet; header.seal
takes any of the three, and header.decode* verify with it.
"""

import binascii
import errno
import hashlib
import hmac
import os

try:
    import _hashlib
except ImportError:            # Python built without OpenSSL
    _hashlib = None
import stat
from pathlib import Path

from .errors import KeyFileError

KEY_LEN = 32
MAX_KEY_ID = 255
LABEL_TOKEN = b"edge-relay v1 token"
LABEL_HEADER = b"edge-relay v1 header"
KEY_SUFFIX = ".key"


def derive(master, label):
    """HKDF-Expand(PRK=master, info=label, L=32) with SHA-256: one block."""
    return hmac.new(master, label + b"\x01", hashlib.sha256).digest()


def keyed_hmac(key):
    """A pre-keyed HMAC-SHA256 state for `key`, as fast as Python offers: copy() it, never update it.

    OpenSSL's C object when available (see the module docstring), else an
    hmac.HMAC; both give the same digests for the same input.
    """
    if _hashlib is not None:
        try:
            return _hashlib.hmac_new(key, digestmod="sha256")
        except (ValueError, AttributeError):      # SHA-256 refused (an odd OpenSSL policy)
            pass
    return hmac.new(key, digestmod=hashlib.sha256)


def split_hmac(key):
    """HMAC-SHA256 for `key` as its two pre-keyed hash states (inner, outer), RFC 2104 section 2.

    inner has absorbed K ^ ipad, outer K ^ opad (K zero-padded to the
    64-octet block, or hashed first when longer). The tag of m is
        o = outer.copy(); o.update(inner_copy_fed_m.digest()); o.digest()
    which is exactly HMAC-SHA256(key, m). The per-packet paths use it
    because two hashlib copies and digests cost less than one HMAC object's
    copy and digest (OpenSSL's HMAC context copies three digest contexts, on
    copy() and again inside digest()): measured ~930 vs ~1190 ns for a
    208-octet datagram's tag.
    """
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    block = key.ljust(64, b"\0")
    return (hashlib.sha256(bytes(b ^ 0x36 for b in block)), hashlib.sha256(bytes(b ^ 0x5C for b in block)))


class Key:
    """One key id: its subkeys and their pre-keyed HMAC-SHA256 states."""

    __slots__ = ("key_id", "token_key", "header_key", "token_mac", "header_mac", "header_openssl_mac",
                 "header_split")

    def __init__(self, key_id, master):
        if not 0 <= key_id <= MAX_KEY_ID:
            raise ValueError(f"key id {key_id} outside 0..{MAX_KEY_ID}")
        if len(master) != KEY_LEN:
            raise ValueError(f"key {key_id}: {len(master)} bytes, expected {KEY_LEN}")
        self.key_id = key_id
        self.token_key = derive(master, LABEL_TOKEN)
        self.header_key = derive(master, LABEL_HEADER)
        self.token_mac = hmac.new(self.token_key, digestmod=hashlib.sha256)
        self.header_mac = hmac.new(self.header_key, digestmod=hashlib.sha256)
        self.header_openssl_mac = keyed_hmac(self.header_key)
        self.header_split = split_hmac(self.header_key)     # what header.py's per-packet paths use


class KeyRing:
    """Accepted keys by id; `signing` is the one used to mint and seal.

    `keys` maps key id -> 32-byte master key. The signing id defaults to the
    lowest (oldest) id present, so that installing a new key never changes
    what a host signs with: the switch is an explicit step, taken once every
    host accepts the new key (docs/PROTOCOL.md section 5.2). `by_id` is a 256-slot list (None where absent) so the
    hot path looks a key id up with one index, no hashing.
    """

    def __init__(self, keys, signing_key_id=None):
        if not keys:
            raise KeyFileError("no keys: at least one key is required (run 'edge-relay keygen')")
        self.by_id = [None] * (MAX_KEY_ID + 1)
        for key_id, master in keys.items():
            self.by_id[key_id] = Key(key_id, master)
        if signing_key_id is None:
            signing_key_id = min(keys)
        if not 0 <= signing_key_id <= MAX_KEY_ID or self.by_id[signing_key_id] is None:
            raise KeyFileError(f"signing key id {signing_key_id} is not among the loaded keys {sorted(keys)}")
        self.signing = self.by_id[signing_key_id]
        self.ids = tuple(sorted(keys))

    def get(self, key_id):
        return self.by_id[key_id] if 0 <= key_id <= MAX_KEY_ID else None


def read_key_file(path):
    """The 32-byte master key in `path`; KeyFileError naming the file otherwise."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:        # O_NOFOLLOW met a symlink: say that, not "Too many levels"
            raise KeyFileError(f"{path}: is a symlink; symlinks are refused (copy the key file here, "
                               "mode 0640)") from None
        raise KeyFileError(f"{path}: cannot open key file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if st.st_mode & 0o007:
            raise KeyFileError(f"{path}: key file is accessible to others (mode {st.st_mode & 0o777:o}); "
                               f"run 'chmod o-rwx {path}'")
        if st.st_mode & 0o020:
            raise KeyFileError(f"{path}: key file is writable by its group (mode {st.st_mode & 0o777:o}); "
                               f"run 'chmod g-w {path}'")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    text = raw.strip()
    try:
        master = binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path}: key file must hold {KEY_LEN * 2} hex digits") from None
    if len(master) != KEY_LEN:
        raise KeyFileError(f"{path}: key is {len(master)} bytes, expected {KEY_LEN} "
                           f"({KEY_LEN * 2} hex digits)")
    return master


def key_id_of(path):
    """The key id a file name carries ('7.key' -> 7), or None."""
    name = Path(path).name
    if not name.endswith(KEY_SUFFIX):
        return None
    stem = name[: -len(KEY_SUFFIX)]
    # ASCII digits only: str.isdigit() also accepts '²' and other scripts' digits
    if not stem or stem.strip("0123456789") or (len(stem) > 1 and stem[0] == "0"):
        return None
    key_id = int(stem)
    return key_id if key_id <= MAX_KEY_ID else None


def load_dir(directory, signing_key_id=None):
    """A KeyRing from every `<id>.key` in `directory`.

    Files not ending in .key are ignored (editors leave backups); a .key file
    whose stem is not a key id is an error, since it was surely meant as one.
    """
    directory = Path(directory)
    try:
        names = sorted(os.listdir(directory))
        mode = os.stat(directory).st_mode
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot list key directory: {exc.strerror}") from None
    if mode & 0o022:
        raise KeyFileError(f"{directory}: key directory is writable by "
                           f"{'others' if mode & 0o002 else 'its group'} (mode {mode & 0o777:o}), who "
                           f"could add or replace keys; run 'chmod go-w {directory}'")
    keys = {}
    for name in names:
        if not name.endswith(KEY_SUFFIX):
            continue
        key_id = key_id_of(name)
        if key_id is None:
            raise KeyFileError(f"{directory / name}: name must be '<key id 0..{MAX_KEY_ID}>{KEY_SUFFIX}'")
        keys[key_id] = read_key_file(directory / name)
    if not keys:
        raise KeyFileError(f"{directory}: no key files (*.key); run 'edge-relay keygen --dir {directory}'")
    return KeyRing(keys, signing_key_id)


def write_key_file(directory, key_id=None, master=None, group=None):
    """Write a new key file with mode 0640 and return its path.

    key_id None picks one above the highest present. The file is created with
    O_EXCL so an existing key is never overwritten. `group` (a gid) lets the
    service group read it.
    """
    directory = Path(directory)
    if key_id is None:
        present = [k for k in (key_id_of(n) for n in os.listdir(directory)) if k is not None] \
            if directory.is_dir() else []
        key_id = max(present) + 1 if present else 1
        if key_id > MAX_KEY_ID:
            raise KeyFileError(f"{directory}: key id {MAX_KEY_ID} is taken; remove old keys first")
    if not 0 <= key_id <= MAX_KEY_ID:
        raise KeyFileError(f"key id {key_id} outside 0..{MAX_KEY_ID}")
    master = os.urandom(KEY_LEN) if master is None else master
    if len(master) != KEY_LEN:
        raise ValueError(f"a master key is {KEY_LEN} octets, got {len(master)}")
    path = directory / f"{key_id}{KEY_SUFFIX}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; not overwriting a key") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create key file: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o640)  # the umask may have taken bits away; never added any
        if group is not None:
            os.fchown(fd, -1, group)
        os.write(fd, binascii.hexlify(master) + b"\n")
    except OSError as exc:
        os.close(fd)
        os.unlink(path)                     # no half-made key left behind
        raise KeyFileError(f"{path}: cannot write key file: {exc.strerror}") from None
    os.close(fd)
    return path
