#!/usr/bin/env python3
"""A Python compute agent's side of the log-pipe hand-off, against a running conlogd.

Usage: agent_handoff.py SOCKET PROTO_DIR LOG_DIR

Generates grpcio stubs from PROTO_DIR (conlog/v1/*.proto) with grpc_tools.protoc, then does
exactly what a compute agent does: Agent.CreateLogPipe over the UNIX socket, the fd.sock
hand-off (token + "\\n", socket.recv_fds, status byte 0x00), writes through the received
descriptor, closes it, and checks ListGuests and the log file. Exits 0 when every check passes.
"""

import os
import socket
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

DEADLINE_S = 30.0


def generate_stubs(proto_dir, out_dir):
    files = sorted(
        os.path.join("conlog", "v1", name)
        for name in os.listdir(os.path.join(proto_dir, "conlog", "v1"))
        if name.endswith(".proto")
    )
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            "-I" + proto_dir,
            "-I" + include,
            "--python_out=" + out_dir,
            "--grpc_python_out=" + out_dir,
            *files,
        ]
    )
    if code != 0:
        sys.exit("protoc failed with status %d" % code)
    sys.path.insert(0, out_dir)


def receive_pipe(fd_socket, token):
    """The fd.sock protocol: returns the write end, or raises with the daemon's error text."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE_S)
        sock.connect(fd_socket)
        sock.sendall(token.encode() + b"\n")
        msg, fds, _flags, _addr = socket.recv_fds(sock, 1024, 1)
        if msg == b"\x00" and len(fds) == 1:
            return fds[0]
        for fd in fds:
            os.close(fd)
        rest = b""
        while True:
            chunk = sock.recv(1024)
            if not chunk:
                break
            rest += chunk
        raise RuntimeError((msg + rest).decode(errors="replace").strip())


def write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def find_stream(stub, pb, guest, stream):
    reply = stub.ListGuests(pb.ListGuestsRequest(), timeout=DEADLINE_S)
    for g in reply.guests:
        if g.name == guest:
            for s in g.streams:
                if s.name == stream:
                    return s
    return None


def wait_closed(stub, pb, guest, stream, offset):
    deadline = time.monotonic() + DEADLINE_S
    info = None
    while time.monotonic() < deadline:
        info = find_stream(stub, pb, guest, stream)
        if info is not None and not info.open and info.offset == offset:
            return info
        time.sleep(0.02)
    raise AssertionError(
        "%s/%s not closed at offset %d; last seen: %s" % (guest, stream, offset, info)
    )


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sock_path, proto_dir, log_dir = sys.argv[1:]
    with tempfile.TemporaryDirectory() as out_dir:
        generate_stubs(proto_dir, out_dir)
        from conlog.v1 import agent_pb2 as pb
        from conlog.v1 import agent_pb2_grpc as pb_grpc
        from conlog.v1 import common_pb2

        channel = grpc.insecure_channel("unix:" + sock_path)
        stub = pb_grpc.AgentStub(channel)
        guest, stream = "py-agent-vm", "qemu"

        # 1. CreateLogPipe with explicit limits.
        reply = stub.CreateLogPipe(
            pb.CreateLogPipeRequest(
                guest=guest,
                stream=stream,
                limits=common_pb2.LogLimits(
                    max_size=1 << 20, max_backups=2, mode=common_pb2.LOG_MODE_ROTATE
                ),
            ),
            timeout=DEADLINE_S,
        )
        check(reply.offset == 0, "new stream offset: %d" % reply.offset)
        check(
            reply.log_path == os.path.join(log_dir, guest, stream + ".log"),
            "log_path: %s" % reply.log_path,
        )
        check(os.path.isabs(reply.fd_socket), "fd_socket: %s" % reply.fd_socket)
        check(reply.handoff_token, "empty token")

        # 2. The hand-off, as QEMU's launcher would do it, then QEMU's writes.
        fd = receive_pipe(reply.fd_socket, reply.handoff_token)
        first = b"".join(b"python line %05d\n" % i for i in range(2000))
        write_all(fd, first)
        os.close(fd)
        info = wait_closed(stub, pb, guest, stream, len(first))
        check(info.writers == 0, "writers after close: %d" % info.writers)
        check(info.kind == pb.STREAM_KIND_PIPE, "kind: %s" % info.kind)

        # 3. A token is single use.
        try:
            receive_pipe(reply.fd_socket, reply.handoff_token)
        except RuntimeError as e:
            check(str(e).startswith("error: "), "refusal text: %r" % str(e))
            check("unknown or already used" in str(e), "refusal text: %r" % str(e))
        else:
            raise AssertionError("a reused token was accepted")

        # 4. A second pipe continues the stream's offsets and file.
        reply2 = stub.CreateLogPipe(
            pb.CreateLogPipeRequest(guest=guest, stream=stream), timeout=DEADLINE_S
        )
        check(reply2.offset == len(first), "second pipe offset: %d" % reply2.offset)
        fd = receive_pipe(reply2.fd_socket, reply2.handoff_token)
        second = bytes(range(256)) * 40
        write_all(fd, second)
        os.close(fd)
        wait_closed(stub, pb, guest, stream, len(first) + len(second))
        with open(reply.log_path, "rb") as f:
            content = f.read()
        check(content == first + second, "log content differs (%d bytes)" % len(content))

        # 5. Invalid names are INVALID_ARGUMENT.
        for bad_guest, bad_stream in [("../etc", "qemu"), ("vm", "Bad")]:
            try:
                stub.CreateLogPipe(
                    pb.CreateLogPipeRequest(guest=bad_guest, stream=bad_stream),
                    timeout=DEADLINE_S,
                )
            except grpc.RpcError as e:
                check(
                    e.code() == grpc.StatusCode.INVALID_ARGUMENT,
                    "%r/%r: %s" % (bad_guest, bad_stream, e.code()),
                )
                check("match" in e.details(), "details: %r" % e.details())
            else:
                raise AssertionError("%r/%r was accepted" % (bad_guest, bad_stream))
        channel.close()
    print("python agent hand-off: ok")


if __name__ == "__main__":
    main()
