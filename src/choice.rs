//! Settings that take one of a few names (the model, the loss, its kernel, the optimizer, the
//! device): one list of spellings per enum gives its `FromStr` (flags), `Display` (messages,
//! flag defaults) and serde form (`config.toml`, the page's JSON), so they cannot drift apart.

/// `choice!(Type, "what", [Variant = "name" | "alias", ...])`: parsing (case-insensitive, aliases
/// accepted, an error that lists the names), printing and serde through the first name.
macro_rules! choice {
    ($ty:ty, $what:literal, [$($variant:ident = $name:literal $(| $alias:literal)*),+ $(,)?]) => {
        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($name $(| $alias)* => Ok(Self::$variant),)+
                    _ => Err(format!(
                        "unknown {} '{s}': expected {}",
                        $what,
                        [$($name),+].join(", ")
                    )),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self {
                    $(Self::$variant => $name,)+
                })
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = String::deserialize(deserializer)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
