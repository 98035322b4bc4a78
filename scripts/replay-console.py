#!/usr/bin/env python3
"""Prints console-like text with a console's timing, for measuring what the time index costs
(docs/performance.md, "Time index").

A guest boots (kernel lines a few milliseconds apart, then service lines), an operator logs in
and types commands (one byte per keystroke echo, ~6 keys a second), each command's output comes
as a burst of lines, and the operator thinks a few seconds between commands. Deterministic
(seeded); writes straight to stdout with one write per line (per keystroke while typing), as a
serial console delivers it. Usage: conlogctl run --guest G -- python3 replay-console.py [SECONDS]
"""
import os
import random
import sys
import time

rnd = random.Random(18)
budget = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
start = time.monotonic()

WORDS = ("pci usb acpi memory cpu irq dma ext4 nvme virtio net eth0 tsc clocksource audit "
         "systemd kvm-clock apic smp mounted device driver registered enabled detected").split()
UNITS = ("systemd-journald cron ssh rsyslog chrony containerd kubelet dbus polkit "
         "systemd-resolved cloud-init multipathd").split()
COMMANDS = ("ls -la /var/log", "ps aux", "df -h", "uptime", "ip a", "journalctl -n 40",
            "free -m", "systemctl status kubelet", "dmesg | tail -30", "uname -a")


def out(text):
    os.write(1, text.encode())


def pause(seconds):
    time.sleep(seconds)


def words(n):
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def boot():
    t = 0.0
    for _ in range(1200):
        t += rnd.expovariate(1 / 0.004)
        out(f"[{t:12.6f}] {words(rnd.randrange(4, 14))}\r\n")
        pause(rnd.expovariate(1 / 0.004))
    for unit in UNITS:
        out(f"[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39m{unit}.service\x1b[0m.\r\n")
        pause(rnd.expovariate(1 / 0.05))
    out("\r\nUbuntu 24.04.1 LTS vm ttyS0\r\n\r\nvm login: ")
    pause(2.0)


def command():
    cmd = rnd.choice(COMMANDS)
    out("\x1b[01;32mroot@vm\x1b[00m:\x1b[01;34m~\x1b[00m$ ")
    for ch in cmd:
        pause(rnd.uniform(0.08, 0.25))
        out(ch)
    out("\r\n")
    pause(0.05)
    lines = rnd.randrange(8, 60) if cmd.startswith(("ps", "ls", "journal", "dmesg")) else rnd.randrange(2, 12)
    for _ in range(lines):
        out(words(rnd.randrange(6, 16)) + "\r\n")
        pause(0.002)
    pause(rnd.uniform(2.0, 6.0))


boot()
while time.monotonic() - start < budget:
    command()
