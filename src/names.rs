//! Validation of guest and stream names (design section 2).
//!
//! Owns the naming rules and nothing else. Every name that reaches a path goes through here
//! first, so no name can reach outside the log, state or runtime directory: the allowed
//! alphabets contain no `/` and no NUL, and a name cannot start with `.`.

use thiserror::Error;

/// Default stream of a log pipe.
pub const DEFAULT_PIPE_STREAM: &str = "qemu";
/// Default device of a console.
pub const DEFAULT_CONSOLE_DEVICE: &str = "serial0";

/// Rule for guest names, as shown to clients.
pub(crate) const GUEST_RULE: &str = "guest names match [A-Za-z0-9][A-Za-z0-9._-]{0,63}";
/// Rule for stream and device names, as shown to clients.
pub(crate) const STREAM_RULE: &str = "stream and device names match [a-z0-9][a-z0-9_-]{0,31}";

/// A name that breaks its rule.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("Invalid {what} {name:?}: {rule}")]
pub struct NameError {
    /// "guest name" or "stream name".
    pub what: &'static str,
    /// The offending name, escaped when shown.
    pub name: String,
    /// The rule that was broken.
    pub rule: &'static str,
}

/// A guest name that obeys [`GUEST_RULE`]: made only by [`GuestName::parse`], so a
/// `GuestName` inside the daemon is never invalid. Handlers parse the names of a request at
/// the edge and pass these inward.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestName(String);

/// A stream or device name that obeys [`STREAM_RULE`]: made only by [`StreamName::parse`] (or
/// [`StreamName::or_default`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamName(String);

impl GuestName {
    /// `name`, if it obeys [`GUEST_RULE`].
    pub fn parse(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        validate_guest(&name)?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl StreamName {
    /// `name`, if it obeys [`STREAM_RULE`].
    pub fn parse(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        validate_stream(&name)?;
        Ok(Self(name))
    }

    /// `name`, or `default` when it is empty.
    pub fn or_default(name: impl Into<String>, default: &str) -> Result<Self, NameError> {
        let name = name.into();
        if name.is_empty() {
            Self::parse(default)
        } else {
            Self::parse(name)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! name_as_str {
    ($($name:ty),+) => {$(
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }
    )+};
}

name_as_str!(GuestName, StreamName);

/// Checks a guest name: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
pub(crate) fn validate_guest(name: &str) -> Result<(), NameError> {
    let ok = matches_rule(
        name,
        64,
        |c| c.is_ascii_alphanumeric(),
        |c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'),
    );
    if ok {
        Ok(())
    } else {
        Err(NameError {
            what: "guest name",
            name: name.to_owned(),
            rule: GUEST_RULE,
        })
    }
}

/// Checks a stream or device name: `[a-z0-9][a-z0-9_-]{0,31}`.
pub(crate) fn validate_stream(name: &str) -> Result<(), NameError> {
    let lower_or_digit = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = matches_rule(name, 32, lower_or_digit, |c| {
        lower_or_digit(c) || matches!(c, b'_' | b'-')
    });
    if ok {
        Ok(())
    } else {
        Err(NameError {
            what: "stream name",
            name: name.to_owned(),
            rule: STREAM_RULE,
        })
    }
}

fn matches_rule(
    name: &str,
    max_len: usize,
    first: impl Fn(u8) -> bool,
    rest: impl Fn(u8) -> bool,
) -> bool {
    let bytes = name.as_bytes();
    match bytes.split_first() {
        Some((head, tail)) => {
            bytes.len() <= max_len && first(*head) && tail.iter().all(|c| rest(*c))
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_names() {
        for good in [
            "vm1",
            "instance-0000001a",
            "3f2a9c1e-8d7b-4e5f-9a0b-1c2d3e4f5a6b",
            "A.b_c-d",
        ] {
            assert!(validate_guest(good).is_ok(), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "-a",
            ".hidden",
            "a\0b",
            "é",
            long.as_str(),
            "a b",
        ] {
            let err = validate_guest(bad).unwrap_err();
            assert_eq!(err.rule, GUEST_RULE, "{bad}");
        }
        assert!(validate_guest(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn stream_names() {
        for good in ["qemu", "serial0", "a", "console-1", "x_y"] {
            assert!(validate_stream(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Serial0",
            "_a",
            "-a",
            "a.b",
            "a/b",
            "..",
            &"a".repeat(33),
        ] {
            assert!(validate_stream(bad).is_err(), "{bad}");
        }
        assert_eq!(
            StreamName::or_default("", "qemu").map(|n| n.as_str().to_owned()),
            Ok("qemu".to_owned())
        );
        assert_eq!(
            StreamName::or_default("serial1", "qemu").map(|n| n.as_str().to_owned()),
            Ok("serial1".to_owned())
        );
        assert!(StreamName::or_default("Bad", "qemu").is_err());
    }

    #[test]
    fn newtypes_exist_only_valid() {
        assert_eq!(GuestName::parse("vm1").unwrap().as_str(), "vm1");
        assert_eq!(GuestName::parse("../x").unwrap_err().rule, GUEST_RULE);
        assert_eq!(StreamName::parse("Serial0").unwrap_err().rule, STREAM_RULE);
        let chosen = StreamName::or_default("", DEFAULT_PIPE_STREAM).unwrap();
        assert_eq!(&*chosen, "qemu");
        assert!(StreamName::or_default("", "Bad").is_err());
        assert_eq!(
            StreamName::or_default("ttys1", "qemu").unwrap().as_str(),
            "ttys1"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::path::{Component, Path};

        /// Names built from the characters that matter to the rules, and any others (mapped
        /// from plain integers: much cheaper to generate than a union of regexes).
        fn name() -> impl Strategy<Value = String> {
            const PIECES: [&str; 10] = [".", "..", "/", "\0", "_", "-", " ", "é", "A", "z"];
            let piece = (any::<u8>(), any::<char>()).prop_map(|(pick, c)| match pick % 16 {
                0..=9 => PIECES[usize::from(pick % 10)].to_owned(),
                10..=13 => char::from(
                    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        [usize::from(pick) % 62],
                )
                .to_string(),
                _ => c.to_string(),
            });
            prop_oneof![
                proptest::collection::vec(piece, 0..80).prop_map(|p| p.concat()),
                any::<String>(),
            ]
        }

        /// What every accepted name must be: one normal path component, of at most `max`
        /// bytes, from the rule's alphabet, not starting with `.`.
        fn assert_safe(name: &str, max: usize, alphabet: impl Fn(char) -> bool) {
            let components: Vec<_> = Path::new(name).components().collect();
            assert_eq!(components, [Component::Normal(name.as_ref())], "{name:?}");
            assert!(!name.is_empty() && name.len() <= max, "{name:?}");
            assert!(!name.starts_with(['.', '-', '_']), "{name:?}");
            assert!(!name.contains(['/', '\0']), "{name:?}");
            assert!(name.chars().all(alphabet), "{name:?}");
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Any string is judged without panicking; an accepted guest name obeys
            /// GUEST_RULE and stays one path component.
            #[test]
            fn accepted_guest_names_obey_the_rule(name in name()) {
                match validate_guest(&name) {
                    Ok(()) => assert_safe(&name, 64, |c| {
                        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
                    }),
                    Err(e) => {
                        prop_assert_eq!(&e.name, &name);
                        prop_assert!(e.to_string().contains(GUEST_RULE));
                    }
                }
            }

            /// The same for stream and device names and STREAM_RULE.
            #[test]
            fn accepted_stream_names_obey_the_rule(name in name()) {
                match validate_stream(&name) {
                    Ok(()) => assert_safe(&name, 32, |c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')
                    }),
                    Err(e) => prop_assert!(e.to_string().contains(STREAM_RULE)),
                }
            }

            /// A `/` or NUL anywhere, a leading `..` and more than the longest length are
            /// refused, even around otherwise valid characters.
            #[test]
            fn poisoned_names_are_refused(
                valid in "[a-z0-9][a-z0-9_-]{0,31}",
                poison in prop_oneof![Just("/"), Just("\0"), Just("/../"), Just("\0..")],
                at in any::<proptest::sample::Index>(),
                padding in 33usize..200,
            ) {
                let at = at.index(valid.len() + 1);
                let poisoned = format!("{}{poison}{}", &valid[..at], &valid[at..]);
                let parent = format!("..{valid}");
                let long = format!("{valid}{}", "a".repeat(padding));
                for bad in [&poisoned, &parent, &format!("../{valid}")] {
                    prop_assert!(validate_guest(bad).is_err(), "guest {:?}", bad);
                    prop_assert!(validate_stream(bad).is_err(), "stream {:?}", bad);
                }
                prop_assert!(validate_stream(&long).is_err());
                prop_assert_eq!(validate_guest(&long).is_ok(), long.len() <= 64);
                let longer = format!("{long}{}", "b".repeat(64));
                prop_assert!(validate_guest(&longer).is_err());
            }
        }
    }
}
