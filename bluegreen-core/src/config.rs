//! Helpers shared by the backends' config types, so that every config reads and writes files the
//! same way.
//!
//! - [`duration`]: `#[serde(with = "bluegreen_core::config::duration")]` writes a
//!   [`Duration`](std::time::Duration) as `"250ms"`, `"5s"`, and reads those, `"2m"`, `"1h"`, or a
//!   plain number of milliseconds.
//! - [`validated_serde!`](crate::validated_serde): a config derives
//!   `Serialize`/`Deserialize` with `#[serde(remote = "Self")]` and this macro implements the
//!   traits on top, running the config's `validate()` after every deserialization: a config read
//!   from a file is as checked as one built with its constructor.
//!
//! # Secrets
//! Config types keep secrets (passwords, tokens) in [`Secret`](crate::Secret), which deserializes
//! from a string but does not implement `Serialize`: each config marks such fields
//! `#[serde(skip_serializing)]`, so a serialized config never holds a secret in clear. Where a
//! file should not hold the secret either, the config names where it is instead (e.g.
//! `password_env` in `bluegreen-postgres`).

/// Durations as `"250ms"`, `"5s"`, `"2m"`, `"1h"` strings, or integers of milliseconds.
///
/// Written as whole seconds (`"5s"`) when there is no fraction of a second, else as
/// milliseconds (`"1500ms"`).
pub mod duration {
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    /// Writes `d` as `"<n>s"` or `"<n>ms"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.subsec_millis() == 0 {
            s.serialize_str(&format!("{}s", d.as_secs()))
        } else {
            s.serialize_str(&format!("{}ms", d.as_millis()))
        }
    }

    /// Reads a string with a unit or a number of milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration such as \"250ms\", \"5s\", \"2m\" or milliseconds")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_millis(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_millis)
                .map_err(|_| E::custom("a duration cannot be negative"))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
        }
    }

    /// Parses `"250ms"`, `"5s"`, `"2m"` (or `"2min"`), `"1h"`; `None` without a known unit.
    pub fn parse(v: &str) -> Option<Duration> {
        let v = v.trim();
        let split = v.find(|c: char| !c.is_ascii_digit())?;
        let (num, unit) = v.split_at(split);
        let n: u64 = num.parse().ok()?;
        match unit.trim() {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" | "min" => Some(Duration::from_secs(n.checked_mul(60)?)),
            "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
            _ => None,
        }
    }
}

/// Implements `Serialize` and a validating `Deserialize` for a config type that derives them
/// with `#[serde(remote = "Self")]` and has `fn validate(&self) -> bluegreen_core::Result<()>`.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// #[serde(remote = "Self", deny_unknown_fields)]
/// struct Config {
///     workers: usize,
/// }
///
/// impl Config {
///     fn validate(&self) -> bluegreen_core::Result<()> {
///         if self.workers == 0 {
///             return Err(bluegreen_core::Error::invalid("workers", "0", "must be at least 1"));
///         }
///         Ok(())
///     }
/// }
///
/// bluegreen_core::validated_serde!(Config);
///
/// let ok: Config = serde_json::from_str(r#"{"workers": 2}"#).unwrap();
/// assert_eq!(ok.workers, 2);
/// let err = serde_json::from_str::<Config>(r#"{"workers": 0}"#).unwrap_err();
/// assert!(err.to_string().contains("at least 1"), "{err}");
/// ```
#[macro_export]
macro_rules! validated_serde {
    ($ty:ty) => {
        impl<'de> $crate::__serde::Deserialize<'de> for $ty {
            fn deserialize<D: $crate::__serde::Deserializer<'de>>(
                deserializer: D,
            ) -> ::core::result::Result<Self, D::Error> {
                let value = <$ty>::deserialize(deserializer)?;
                value
                    .validate()
                    .map_err(<D::Error as $crate::__serde::de::Error>::custom)?;
                ::core::result::Result::Ok(value)
            }
        }

        impl $crate::__serde::Serialize for $ty {
            fn serialize<S: $crate::__serde::Serializer>(
                &self,
                serializer: S,
            ) -> ::core::result::Result<S::Ok, S::Error> {
                <$ty>::serialize(self, serializer)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::duration;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(duration::parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(duration::parse("5s"), Some(Duration::from_secs(5)));
        assert_eq!(duration::parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(duration::parse("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(duration::parse("5"), None);
        assert_eq!(duration::parse("s"), None);
        assert_eq!(duration::parse("5 parsecs"), None);
    }
}
