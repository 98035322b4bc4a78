//! Unguessable identifiers: hand-off tokens and console session ids.
//!
//! Owns nothing but the generator: 128 bits from the kernel's CSPRNG as 32 hex digits.

use std::io;

/// 128 random bits as 32 lowercase hex digits.
pub fn random_id() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        filled +=
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
