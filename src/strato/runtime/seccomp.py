"""The seccomp filter of a ``bwrap`` container (and of a container forked by a zygote).

An equivalent of Docker's default profile written as a deny-list: every system call is
allowed except those that reach the kernel's most dangerous surfaces, which fail with
``EPERM`` (``clone3`` with ``ENOSYS``, so that the C library falls back to ``clone``, whose
flags the filter can see):

- kernel keyrings (``keyctl``, ``add_key``, ``request_key``), eBPF (``bpf``),
  ``perf_event_open``, ``userfaultfd``, ``io_uring_*``;
- process inspection across processes (``ptrace``, ``process_vm_*``, ``kcmp``,
  ``pidfd_getfd``);
- mounting and namespaces (``mount``, ``umount2``, the new mount API, ``pivot_root``,
  ``setns``, ``unshare`` and ``clone`` with any ``CLONE_NEW*`` flag), ``chroot``;
- kernel modules, ``kexec``, ``reboot``, swap, ``acct``, quotas, ``syslog``, the clock
  (``settimeofday``, ``clock_settime``, ``clock_adjtime``), ``open_by_handle_at`` (the
  "shocker" escape), ``iopl``/``ioperm``, ``personality`` turning ASLR off, and
  obsolete calls (``uselib``, ``ustat``, ``sysfs``, ``_sysctl``, ``nfsservctl``...).

Calls of another architecture (32-bit ``int 0x80`` on x86_64) kill the process: the filter
is compiled for this machine's architecture only. The program is compiled once per process
with libseccomp (``libseccomp.so.2``, Debian's ``libseccomp2``, which bubblewrap already
depends on) through :mod:`ctypes` and exported as classic BPF: bubblewrap installs it with
``--seccomp FD``; :func:`load_filter` installs it in the calling process (stdlib only), for
containers forked by a zygote.

gVisor containers get none of this: their system calls never reach the host kernel (the
sentry serves them, itself under runsc's own seccomp filter).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading

# libseccomp's actions and comparison operators (seccomp.h)
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_KILL_PROCESS = 0x80000000


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0x0000FFFF)


_SCMP_CMP_MASKED_EQ = 7

# prctl(2) / seccomp(2)
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
    CLONE_NEWTIME,
)

DENIED = (
    # keyrings, eBPF, perf, userfaultfd, io_uring
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "fanotify_init",
    # other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "kcmp",
    "pidfd_getfd",
    # mounts and namespaces
    "mount",
    "umount",
    "umount2",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "pivot_root",
    "chroot",
    "setns",
    # the kernel itself
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "name_to_handle_at",
    "open_by_handle_at",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "nfsservctl",
    "vm86",
    "vm86old",
    "vhangup",
)
"""System calls that always fail with ``EPERM``."""

PERSONALITY_DENIED_FLAGS = (0x0040000, 0x0400000)
"""``personality`` flags refused: ``ADDR_NO_RANDOMIZE`` (turns ASLR off) and
``READ_IMPLIES_EXEC`` (values with bit 31 clear: ``0xffffffff`` is a query)."""
_PERSONALITY_QUERY_BIT = 0x80000000

_lock = threading.Lock()
_cached: bytes | None = None


class SeccompUnavailable(RuntimeError):
    """libseccomp is missing or refused to build the filter."""


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        try:
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError as exc:
            raise SeccompUnavailable(
                "libseccomp is not installed (apt-get install libseccomp2): containers "
                "cannot get a seccomp filter"
            ) from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, *cmps: _ArgCmp) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # not a system call of this architecture (e.g. vm86 on arm64)
        return
    arr = (_ArgCmp * max(len(cmps), 1))(*cmps)
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr if cmps else None)
    if rc < 0 and -rc != errno.EEXIST:
        raise SeccompUnavailable(f"libseccomp refused the rule for {name}: {os.strerror(-rc)}")


def _compile() -> bytes:
    lib = _lib()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        eperm = _act_errno(errno.EPERM)
        for name in DENIED:
            _rule(lib, ctx, eperm, name)
        _rule(lib, ctx, _act_errno(errno.ENOSYS), "clone3")
        for flag in NAMESPACE_FLAGS:
            masked = _ArgCmp(0, _SCMP_CMP_MASKED_EQ, flag, flag)
            _rule(lib, ctx, eperm, "unshare", masked)
            _rule(lib, ctx, eperm, "clone", masked)  # flags are arg 0 (x86_64, arm64)
        for flag in PERSONALITY_DENIED_FLAGS:
            mask = flag | _PERSONALITY_QUERY_BIT  # 0xffffffff only asks for the persona
            _rule(lib, ctx, eperm, "personality", _ArgCmp(0, _SCMP_CMP_MASKED_EQ, mask, flag))
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _export(lib: ctypes.CDLL, ctx: int) -> bytes:
    fd = os.memfd_create("strato-seccomp", os.MFD_CLOEXEC)
    try:
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
        size = os.fstat(fd).st_size
        os.lseek(fd, 0, os.SEEK_SET)
        out = b""
        while len(out) < size:
            chunk = os.read(fd, size - len(out))
            if not chunk:
                break
            out += chunk
    finally:
        os.close(fd)
    if not out or len(out) % 8:
        raise SeccompUnavailable(f"libseccomp exported a malformed program ({len(out)} bytes)")
    return out


def filter_bpf() -> bytes:
    """The filter for this machine's architecture, as classic BPF (``struct sock_filter``
    array), compiled once per process. Raises :class:`SeccompUnavailable`."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = _compile()
        return _cached


def filter_fd() -> int:
    """A new file descriptor (memfd, not close-on-exec, at offset 0) holding
    :func:`filter_bpf`, for ``bwrap --seccomp FD``. The caller closes it."""
    bpf = filter_bpf()
    fd = os.memfd_create("strato-seccomp", 0)
    try:
        view = memoryview(bpf)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_filter(bpf: bytes) -> None:
    """Install ``bpf`` (from :func:`filter_bpf`) in the calling process: sets
    ``no_new_privs`` then ``PR_SET_SECCOMP``/``SECCOMP_MODE_FILTER``. Inherited by every
    child; cannot be removed. Raises ``OSError``."""
    if not bpf or len(bpf) % 8:
        raise ValueError("not a BPF program (its length is not a multiple of 8)")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]  # fmt: skip
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


__all__ = [
    "DENIED",
    "SeccompUnavailable",
    "filter_bpf",
    "filter_fd",
    "load_filter",
]
