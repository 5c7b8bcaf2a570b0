"""The isolation of a container forked by a zygote: what the fork server
(:mod:`strato.container.zygote`) calls to set it up.

For the monitor (C): its namespaces and mounts (``isolate``: a new user namespace, or the
one the worker made ahead, with mount, PID, IPC, UTS, cgroup and network namespaces; fresh
``/tmp``, ``/dev/shm``, ``/run`` and homes; an image's overlay root; the binds; the spec;
the hostname), in step with the worker over the control socket (``send``, the worker's
answers awaited). For the container's main process (G): its own read-only ``/proc``
(``mount_proc``), its root (``enter_root``), its user or capabilities (``become``,
``drop_capabilities``), its seccomp filter (``load_seccomp``) and its environment as
``/proc/<pid>/environ`` shows it (``show_environment``).

Only the standard library and what the container runtime imports anyway are used here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

from strato.protocol import zygote as zp
from strato.runtime.seccomp import (  # stdlib only; the zygote pre-imports it anyway
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

PR_SET_PDEATHSIG = 1
PR_SET_MM = 35
PR_SET_MM_MAP = 14
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522

CAPS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18,
    "CAP_MKNOD": 27,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}

PROC_SOURCE = "/run/strato/.proc"
"""Where the worker binds an empty, read-only proc (of a PID namespace with no process):
the proof the kernel asks for before a user namespace may mount a proc of its own."""

libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        libc.mount(
            src.encode() if src else None,
            dst.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {src or fstype} on {dst}",
    )


# ------------------------------------------------------------------------- the monitor (C)


def send(ctl: socket.socket, msg: zp.ForkReport) -> None:
    try:
        ctl.sendall(zp.encode(msg))
    except OSError:
        pass


def close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def isolate(req: zp.ForkRequest, ctl: socket.socket, ns_fds: list[int]) -> str:
    """The container's namespaces and mounts; returns the root it will pivot into ("" for
    none: it keeps the zygote's). With ``netns`` (or ``block_network``) it gets a network
    namespace of its own, with ``egress`` one the worker gives outbound access to (a
    user-mode network stack attached to it) while the mounts are made. With ``ns_fds``
    (a user and a network namespace the worker made ahead, ids mapped and egress attached)
    it joins those instead of making them: the owner of a user namespace (root, as the
    zygote is) may, without any capability of the host's."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    if ns_fds:
        userns, netns = ns_fds
        _check(libc.setns(userns, CLONE_NEWUSER), "joining its user namespace")
        _check(libc.setns(netns, CLONE_NEWNET), "joining its network namespace")
        os.close(userns)
        os.close(netns)
    else:
        flags |= CLONE_NEWUSER
        if req.netns or req.block_network:
            flags |= CLONE_NEWNET
    _check(libc.unshare(flags), "unshare")
    os.umask(0o022)  # what it makes here is for the container's user to read
    egress = req.egress and bool(flags & CLONE_NEWNET)
    user = req.user  # (uid, gid) the container runs as, the same on the host
    if ns_fds or flags & CLONE_NEWNET:
        _loopback_up()  # (before a network stack is attached: both configure links)
    if ns_fds:  # ids mapped and egress attached already
        pass
    elif user:
        # root stays root (the same uid outside) while it sets up, with capabilities in
        # these namespaces only; the worker (root outside) also maps the container's ids
        # and attaches the network stack meanwhile
        send(ctl, zp.NamespacesMade())
        _await(ctl, zp.IdsMapped)
    else:
        _write("/proc/self/uid_map", "0 0 1")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/gid_map", "0 0 1")
        if egress:
            send(ctl, zp.NamespacesMade())  # the worker attaches the network stack meanwhile
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # the binds, from the zygote's view
    sources = [(os.open(src, os.O_PATH | os.O_CLOEXEC), dst) for src, dst in req.binds]
    size = f",size={req.disk_mb}m" if req.disk_mb is not None else ""
    _fresh("/tmp", size)
    root = ""
    layers = req.layers
    if layers:  # the image with a writable layer of its own (in memory), like any container
        root = "/tmp/root"
        for d in ("/tmp/rw/upper", "/tmp/rw/work", root):
            os.makedirs(d)
        os.chmod("/tmp/rw/upper", 0o755)
        options = f"lowerdir={':'.join(layers)},upperdir=/tmp/rw/upper,workdir=/tmp/rw/work"
        _mount("overlay", root, "overlay", 0, options + ",userxattr")
        _mount("/dev", root + "/dev", None, MS_BIND | MS_REC)
        _mount("/sys", root + "/sys", None, MS_BIND | MS_REC)
        _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" + size)
        for d in req.owned:  # its home and workdir: the container user's
            os.makedirs(root + d, exist_ok=True)
            if user:
                os.chown(root + d, user[0], user[1])
    else:  # fresh homes of its own (as a bwrap container's minimal root has them)
        for d in ("/root", "/home"):
            if os.path.isdir(d):
                _fresh(d, size)
    if os.path.isdir(root + "/dev/shm"):
        _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" + size)
    # a /run of its own hides the zygote's (its code mounts, the empty proc)
    _mount("tmpfs", root + "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755" + size)
    for fd, dst in sources:
        target = root + dst
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
        os.close(fd)
    spec_path, spec = req.spec_path, req.spec
    if spec_path and spec is not None:
        os.makedirs(os.path.dirname(root + spec_path), exist_ok=True)
        with open(root + spec_path, "wb") as f:
            f.write(spec)
    hostname = req.hostname.encode()[:63]
    _check(libc.sethostname(hostname, len(hostname)), "sethostname")
    if egress:
        _await(ctl, zp.EgressAttached)
    return root


def _fresh(path: str, size: str = "") -> None:
    """A new, empty tmpfs (``1777``; ``size``: ``",size=Nm"`` or ``""``) of its own at
    ``path`` (the zygote's is shared by every container forked from it), with what the
    zygote has mounted below it bound back (the interpreter may live under ``/root`` or
    ``/tmp``)."""
    below = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(path + "/") and point not in below:
                below.append(point)  # parents before children, as the table lists them
    held = [(os.open(p, os.O_PATH | os.O_CLOEXEC), p) for p in below]
    _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" + size)
    for fd, point in held:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(point, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(point), exist_ok=True)
            os.close(os.open(point, os.O_CREAT | os.O_WRONLY, 0o644))
        _mount(f"/proc/self/fd/{fd}", point, None, MS_BIND | MS_REC)
        os.close(fd)


def _await(ctl: socket.socket, kind: type[zp.IdsMapped] | type[zp.EgressAttached]) -> None:
    """Wait for the worker's answer ``kind`` with ``ok`` (else raise, with its reason)."""
    what = {zp.IdsMapped: "ids", zp.EgressAttached: "egress"}[kind]
    data = ctl.recv(1 << 16)
    try:
        answer = zp.decode_answer(data) if data else None
    except ValueError:
        answer = None
    if not isinstance(answer, kind) or not answer.ok:
        why = answer.error if isinstance(answer, kind) else None
        raise OSError(errno.EPERM, f"the worker did not give the container its {what}: {why}")


_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


def enter_root(root: str) -> None:
    """Make ``root`` the root (``pivot_root``) and drop the zygote's tree under it."""
    os.chdir(root)
    os.makedirs(".oldroot", exist_ok=True)
    number = _PIVOT_ROOT.get(os.uname().machine, 41)
    _check(libc.syscall(number, b".", b".oldroot"), "pivot_root")
    _check(libc.umount2(b"/.oldroot", 2), "unmounting the zygote's root")  # MNT_DETACH
    os.rmdir("/.oldroot")
    os.chdir("/")


def _loopback_up() -> None:
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), siocgifflags, ifreq))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


# ------------------------------------------------------------------------- the container (G)


def drop_capabilities(keep: list[str]) -> None:
    mask = 0
    for name in keep:
        mask |= 1 << CAPS[name]
    _drop_bounding_set(mask)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    _check(libc.capset(ctypes.byref(header), data), "capset")


def become(uid: int, gid: int) -> None:
    """Run as ``uid``:``gid`` (mapped to the same ids on the host), with no supplementary
    group and no capability left, not even in the bounding set (as ``setpriv`` does for a
    container bwrap starts)."""
    _drop_bounding_set(keep=0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from root to none: permitted and effective sets cleared
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_CAP_VERSION_3, 0)
    _check(libc.capset(ctypes.byref(header), (_CapData * 2)()), "capset")


def _drop_bounding_set(keep: int) -> None:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        if not keep & (1 << cap):
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")


class _MMMap(ctypes.Structure):
    _fields_ = [  # type: ignore[assignment]
        (name, ctypes.c_uint64)
        for name in (
            "start_code",
            "end_code",
            "start_data",
            "end_data",
            "start_brk",
            "brk",
            "start_stack",
            "arg_start",
            "arg_end",
            "env_start",
            "env_end",
        )
    ] + [("auxv", ctypes.c_void_p), ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


_environ_block: ctypes.Array | None = None


def show_environment(env: dict[str, str]) -> None:
    """Make ``/proc/<pid>/environ`` show the container's environment, not the zygote's (as
    tools that find a container by its ``STRATO_CONTAINER_ID`` expect). Best effort:
    ``PR_SET_MM_MAP`` needs no privilege, but a kernel without checkpoint/restore lacks it."""
    global _environ_block
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        stat = [0, 0, 0, 0, *map(int, fields[1:])]  # stat[n]: field n of proc(5), from 4
        block = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
        buf = ctypes.create_string_buffer(block, len(block))
        libc.sbrk.restype = ctypes.c_void_p
        start = ctypes.addressof(buf)
        mm = _MMMap(
            stat[26], stat[27], stat[45], stat[46], stat[47], libc.sbrk(0) or stat[47],
            stat[28], stat[48], stat[49], start, start + len(block), None, 0, 0xFFFFFFFF,
        )  # fmt: skip
        if libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) == 0:
            _environ_block = buf  # must live as long as the process
    except (OSError, ValueError, IndexError):
        pass


def mount_proc(target: str) -> None:
    """Mount the PID namespace's own proc (read-only) at ``target``. The kernel allows it
    in a user namespace only where a proc at least as restrictive is fully visible in the
    mount namespace (no locked mount over any of its files): the empty proc bound at
    ``PROC_SOURCE`` is that proof."""
    try:
        _mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    except OSError as e:
        if e.errno == errno.EPERM and not _is_proc_root(PROC_SOURCE):
            hint = f"{PROC_SOURCE} is no proc mount, so nothing proves it may: {e.strerror}"
            raise OSError(e.errno, f"mount proc on {target}: {hint}") from None
        raise


def _is_proc_root(path: str) -> bool:
    try:
        st, parent = os.stat(path), os.stat(os.path.dirname(path))
    except OSError:
        return False
    return st.st_dev != parent.st_dev and st.st_ino == 1  # proc's root is inode 1


def load_seccomp(bpf: bytes) -> None:
    from strato.runtime.seccomp import load_filter  # imported by the zygote already

    load_filter(bpf)
