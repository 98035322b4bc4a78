//! Human units in the configuration: sizes like `2MiB` and durations like `30s`.
//!
//! Owns parsing and printing of these two value types, so that `--print-config` prints what a
//! user would write and every bad value gets a one-line explanation of the accepted form.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A number of bytes, written `4096`, `64KiB`, `2MiB`, `1GiB` (binary) or `2MB` (decimal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

const SIZE_UNITS: [(&str, u64); 9] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

const SIZE_HELP: &str =
    "use a whole number with an optional unit B, KiB, MiB, GiB, TiB, KB, MB, GB or TB (e.g. 2MiB)";
const DURATION_HELP: &str = "use a whole number with a unit ms, s, m, h or d (e.g. 30s)";

impl ByteSize {
    /// Parses `2MiB`, `2 MiB`, `4096`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (number, unit) = split_number(text);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("invalid size {text:?}: {SIZE_HELP}"))?;
        let factor = if unit.is_empty() {
            1
        } else {
            SIZE_UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, factor)| *factor)
                .ok_or_else(|| format!("invalid size unit {unit:?} in {text:?}: {SIZE_HELP}"))?
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }

    /// The value in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// The value in bytes as a buffer length. Saturating: lossless on 64-bit targets, and on
    /// narrower ones a size beyond the address space could not be allocated anyway.
    pub(crate) fn bytes_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let binary = SIZE_UNITS.iter().filter(|(name, _)| name.ends_with("iB"));
        for (name, factor) in binary {
            if self.0 >= *factor && self.0.is_multiple_of(*factor) {
                return write!(f, "{}{name}", self.0 / factor);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A duration, written `500ms`, `30s`, `10m`, `1h`, `7d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

const DURATION_UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl HumanDuration {
    /// Parses `30s`, `10m`, `500ms`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (number, unit) = split_number(text);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: {DURATION_HELP}"))?;
        let millis = DURATION_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, factor)| *factor)
            .ok_or_else(|| format!("invalid duration {text:?}: {DURATION_HELP}"))?;
        number
            .checked_mul(millis)
            .map(|ms| HumanDuration(Duration::from_millis(ms)))
            .ok_or_else(|| format!("duration {text:?} is too long"))
    }

    /// The value as a std duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        for (name, factor) in DURATION_UNITS {
            if millis >= factor && millis.is_multiple_of(factor) {
                return write!(f, "{}{name}", millis / factor);
            }
        }
        write!(f, "0s")
    }
}

fn split_number(text: &str) -> (&str, &str) {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    (&text[..split], text[split..].trim_start())
}

macro_rules! human_serde {
    ($type:ty, $expecting:literal) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl de::Visitor<'_> for Visitor {
                    type Value = $type;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$type, E> {
                        <$type>::parse(v).map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$type, E> {
                        <$type>::parse(&v.to_string()).map_err(E::custom)
                    }
                }
                deserializer.deserialize_any(Visitor)
            }
        }
    };
}

human_serde!(ByteSize, "a size such as 2MiB");
human_serde!(HumanDuration, "a duration such as 30s");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("2MiB"), Ok(ByteSize(2 << 20)));
        assert_eq!(ByteSize::parse("2 MiB"), Ok(ByteSize(2 << 20)));
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert_eq!(ByteSize::parse("3MB"), Ok(ByteSize(3_000_000)));
        assert!(ByteSize::parse("2XB").unwrap_err().contains("unit"));
        assert!(ByteSize::parse("-1").is_err());
        assert!(ByteSize::parse("99999999999TiB").is_err());
        assert_eq!(ByteSize(2 << 20).to_string(), "2MiB");
        assert_eq!(ByteSize(1500).to_string(), "1500B");
    }

    /// Every unit's factor, and the largest binary unit that divides a value when printing.
    #[test]
    fn every_size_unit() {
        for (text, bytes) in [
            ("7B", 7),
            ("64KiB", 64 << 10),
            ("3GiB", 3 << 30),
            ("2TiB", 2 << 40),
            ("5KB", 5_000),
            ("2GB", 2_000_000_000),
            ("1TB", 1_000_000_000_000),
        ] {
            assert_eq!(
                ByteSize::parse(text).map(ByteSize::bytes),
                Ok(bytes),
                "{text}"
            );
        }
        for (bytes, text) in [
            (0, "0B"),
            (1024, "1KiB"),
            (1536, "1536B"),
            (3 << 30, "3GiB"),
            (5 << 40, "5TiB"),
            ((1 << 30) + (1 << 20), "1025MiB"),
        ] {
            assert_eq!(ByteSize(bytes).to_string(), text, "{bytes}");
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            HumanDuration::parse("30s").unwrap().get(),
            Duration::from_secs(30)
        );
        assert_eq!(
            HumanDuration::parse("10m").unwrap().get(),
            Duration::from_secs(600)
        );
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().get(),
            Duration::from_millis(250)
        );
        assert!(HumanDuration::parse("30").is_err());
        assert!(HumanDuration::parse("soon").is_err());
        assert_eq!(HumanDuration(Duration::from_secs(90)).to_string(), "90s");
        assert_eq!(HumanDuration(Duration::from_secs(600)).to_string(), "10m");
        for (millis, text) in [
            (0, "0s"),
            (250, "250ms"),
            (1500, "1500ms"),
            (3 * 3_600_000, "3h"),
            (2 * 86_400_000, "2d"),
        ] {
            let duration = HumanDuration(Duration::from_millis(millis));
            assert_eq!(duration.to_string(), text, "{millis}");
            if millis > 0 {
                assert_eq!(HumanDuration::parse(text), Ok(duration), "{text}");
            }
        }
    }
}
