//! Console helpers shared by the console tests: a fake guest playing QEMU's side of the guest
//! socket, and AttachConsole / WatchConsole clients.
