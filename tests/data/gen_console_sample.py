# Synthetic console/QEMU log of SIZE_BYTES (the committed sample: 1 MiB): repeated boots (real dmesg lines re-timestamped with
# varying numbers), systemd status lines with ANSI colour, login + interactive shell sessions
# (commands, ls/ps/df output, prompts with colour), apt/dpkg activity, a periodic kernel
# warning with a stack dump, and QEMU stderr lines. Deterministic (seeded).
import random, sys
args = sys.argv[1:]
if len(args) != 3:
    sys.exit("usage: gen_console_sample.py DMESG_TXT DPKG_LOG SIZE_BYTES")
rnd = random.Random(42)
dmesg = [l.split('] ',1)[1] if '] ' in l else l for l in open(args[0]).read().splitlines()]
dpkg = open(args[1]).read().splitlines()
units = ["systemd-journald.service","systemd-udevd.service","networkd-dispatcher.service","ssh.service",
 "cron.service","rsyslog.service","snapd.service","cloud-init.service","chrony.service","containerd.service",
 "kubelet.service","getty@tty1.service","serial-getty@ttyS0.service","systemd-resolved.service","dbus.service",
 "polkit.service","unattended-upgrades.service","apparmor.service","multipathd.service","lvm2-monitor.service"]
cmds = ["ls -la /var/log","ps aux","df -h","uptime","cat /proc/meminfo","ip a","journalctl -n 20","free -m",
 "systemctl status kubelet","dmesg | tail","top -bn1 | head -20","uname -a","tail -f /var/log/syslog"]
users=["root","ubuntu","admin"]; procs=["sshd","systemd","kworker/0:1","bash","python3","java","nginx","postgres","containerd","kubelet"]
out=[]; size=0; target=int(args[2])
def emit(s):
    global size; out.append(s); size+=len(s)
boot=0
while size<target:
    boot+=1; t=0.0; host=f"vm-{rnd.randrange(1000):03d}"
    emit(f"qemu-system-x86_64: -chardev socket,id=serial0,path=/run/conlog/consoles/{host}/serial0.guest.sock,reconnect-ms=1000: info: QEMU waiting for connection\r\n")
    emit("SeaBIOS (version 1.16.3-debian-1.16.3-2)\r\n\r\niPXE (https://ipxe.org) 00:03.0 CA00 PCI2.10 PnP PMM+BEFD0F40+BEF2F40 CA00\r\n\r\nBooting from Hard Disk...\r\n")
    for l in dmesg:
        t+=rnd.expovariate(1/0.004)
        l2=''.join(c if not c.isdigit() or rnd.random()>0.15 else str(rnd.randrange(10)) for c in l)
        emit(f"[{t:12.6f}] {l2}\r\n")
    for u in rnd.sample(units,len(units)):
        t+=rnd.expovariate(1/0.05)
        emit(f"[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39m{u}\x1b[0m - {u.split('.')[0].replace('-',' ').title()}.\r\n")
        if rnd.random()<0.05: emit(f"[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39m{u}\x1b[0m.\r\nSee 'systemctl status {u}' for details.\r\n")
    emit(f"\r\nUbuntu 24.04.1 LTS {host} ttyS0\r\n\r\n{host} login: ")
    for s in range(rnd.randrange(3,12)):
        user=rnd.choice(users); emit(f"{user}\r\nPassword: \r\nLast login: Sat Dec  5 0{rnd.randrange(10)}:{rnd.randrange(60):02d}:{rnd.randrange(60):02d} UTC 2026 on ttyS0\r\n")
        for c in range(rnd.randrange(5,30)):
            cmd=rnd.choice(cmds)
            emit(f"\x1b[01;32m{user}@{host}\x1b[00m:\x1b[01;34m~\x1b[00m$ {cmd}\r\n")
            if cmd.startswith("ps"):
                emit("USER         PID %CPU %MEM    VSZ   RSS TTY      STAT START   TIME COMMAND\r\n")
                for i in range(rnd.randrange(20,80)):
                    emit(f"{rnd.choice(users):<8} {rnd.randrange(1,40000):>7} {rnd.random()*5:4.1f} {rnd.random()*3:4.1f} {rnd.randrange(1000,900000):>6} {rnd.randrange(100,90000):>5} ?        S{rnd.choice('s<l+')}   0{rnd.randrange(10)}:{rnd.randrange(60):02d}   0:{rnd.randrange(60):02d} {rnd.choice(procs)}\r\n")
            elif cmd.startswith("ls"):
                for i in range(rnd.randrange(10,40)):
                    emit(f"-rw-r--r--  1 root root {rnd.randrange(0,999999):>7} Dec  {rnd.randrange(1,6)} {rnd.randrange(24):02d}:{rnd.randrange(60):02d} \x1b[0m{rnd.choice(['syslog','kern.log','auth.log','dpkg.log','cloud-init.log','apt/history.log'])}.{rnd.randrange(9)}\r\n")
            elif "tail" in cmd or "journal" in cmd or "dmesg" in cmd:
                for i in range(rnd.randrange(10,60)):
                    emit(f"Dec 05 0{rnd.randrange(10)}:{rnd.randrange(60):02d}:{rnd.randrange(60):02d} {host} {rnd.choice(procs)}[{rnd.randrange(100,40000)}]: {rnd.choice(dmesg)}\r\n")
            else:
                for i in range(rnd.randrange(2,15)):
                    d=rnd.choice(dpkg) if rnd.random()<0.5 else rnd.choice(dmesg)
                    emit(d+"\r\n")
            if rnd.random()<0.02:
                emit(f"[{t+rnd.random()*1000:12.6f}] ------------[ cut here ]------------\r\n[{t:12.6f}] WARNING: CPU: {rnd.randrange(8)} PID: {rnd.randrange(40000)} at mm/page_alloc.c:{rnd.randrange(9000)} __alloc_pages+0x{rnd.randrange(1<<16):x}/0x{rnd.randrange(1<<16):x}\r\n")
                for i in range(12): emit(f"[{t:12.6f}]  ? {rnd.choice(['__schedule','do_syscall_64','entry_SYSCALL_64_after_hwframe','ksys_read','vfs_read','kmalloc_trace','__x64_sys_ioctl'])}+0x{rnd.randrange(1<<12):x}/0x{rnd.randrange(1<<12):x}\r\n")
                emit(f"[{t:12.6f}] RIP: 0033:0x{rnd.randrange(1<<48):x}\r\n[{t:12.6f}] ---[ end trace {rnd.randrange(1<<64):016x} ]---\r\n")
        emit("logout\r\n")
    if rnd.random()<0.3: emit(f"qemu-system-x86_64: terminating on signal 15 from pid {rnd.randrange(1000,99999)} (/usr/sbin/libvirtd)\r\n")
    emit(f"[{t:12.6f}] reboot: Restarting system\r\n")
sys.stdout.write(''.join(out)[:target])
