//! Names and ids that come from people and the network, as types: each is checked once, when
//! it is made (parsed from a string or deserialized), so code that holds one never checks
//! again and never builds a path or a command out of an unchecked string.

use std::{fmt, ops::Deref, str::FromStr};

use serde::{Deserialize, Serialize};

/// A string that is not a valid name of its kind, and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value:?}: {rule}")]
pub struct NameError {
    pub kind: &'static str,
    pub value: String,
    pub rule: &'static str,
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $rule:literal, $valid:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The rule a valid value follows, for error messages and docs.
            pub const RULE: &'static str = $rule;

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;

            fn from_str(s: &str) -> Result<Self, NameError> {
                let valid: fn(&str) -> bool = $valid;
                if valid(s) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(NameError {
                        kind: $kind,
                        value: s.to_owned(),
                        rule: $rule,
                    })
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;

            fn try_from(s: String) -> Result<Self, NameError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                std::path::Path::new(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

fn chars_in(s: &str, extra: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
}

name_type!(
    /// A group's name, as people define it: 1–64 of `[A-Za-z0-9_-]` (it also names snapshot
    /// directories, so nothing else).
    GroupName,
    "group name",
    "1-64 of [A-Za-z0-9_-]",
    |s| !s.is_empty() && s.len() <= 64 && chars_in(s, "_-")
);

name_type!(
    /// A snapshot's id, which names its directory in a store: exactly the form the
    /// coordinator makes, `<group>-<unix ms>-e<epoch>` (a group name, then digits), so never a
    /// path and never one of the store's own entries (`journals`, `groups.json`: case S9 of
    /// the security review).
    SnapshotId,
    "snapshot id",
    "<group>-<unix ms>-e<epoch>: a group name (1-64 of [A-Za-z0-9_-]), then digits",
    snapshot_id_ok
);

fn snapshot_id_ok(s: &str) -> bool {
    let digits = |d: &str| !d.is_empty() && d.len() <= 20 && d.bytes().all(|b| b.is_ascii_digit());
    let Some((rest, epoch)) = s.rsplit_once("-e") else {
        return false;
    };
    let Some((group, unix_ms)) = rest.rsplit_once('-') else {
        return false;
    };
    digits(epoch) && digits(unix_ms) && group.parse::<GroupName>().is_ok()
}

name_type!(
    /// A network interface's name (a bridge, a port): 1–15 of `[A-Za-z0-9_.-]` (IFNAMSIZ less
    /// the NUL; no `/`, quote or space, so it is safe in a path, a command and domain XML).
    IfName,
    "interface name",
    "1-15 of [A-Za-z0-9_.-]",
    |s| !s.is_empty() && s.len() <= 15 && chars_in(s, "_.-")
);

impl SnapshotId {
    /// The id of a group's snapshot started at `unix_ms` that moves the group to `epoch`.
    pub fn new(group: &GroupName, unix_ms: u128, epoch: u32) -> Self {
        // Valid by construction: a group name, digits, `-` and `e`.
        Self(format!("{group}-{unix_ms}-e{epoch}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names() {
        for ok in ["web", "a", "db_1-b", &"x".repeat(64)] {
            assert_eq!(ok.parse::<GroupName>().unwrap().as_str(), ok);
        }
        for bad in ["", "bad name!", "a/b", "..", "é", &"x".repeat(65)] {
            let err = bad.parse::<GroupName>().unwrap_err();
            assert!(err.to_string().contains("name"), "{err}");
        }
    }

    #[test]
    fn snapshot_ids_are_never_paths() {
        for ok in ["g-1-e1", "web-1764547200000-e12", "web-east-17-e3"] {
            ok.parse::<SnapshotId>().unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "a.b",
            "journals",
            "groups.json",
            "manifest.json",
            "web-1-e",
            "web--e1",
            "-1-e1",
            "web-x-e1",
            "../web-1-e1",
            &format!("{}-1-e1", "x".repeat(65)),
        ] {
            assert!(bad.parse::<SnapshotId>().is_err(), "{bad:?}");
        }
        let g: GroupName = "web".parse().unwrap();
        assert_eq!(SnapshotId::new(&g, 17, 3).as_str(), "web-17-e3");
    }

    #[test]
    fn interface_names() {
        for ok in ["br0", "enfbr0", "vnet12", "a.b-c_d", "x23456789012345"] {
            ok.parse::<IfName>().unwrap();
        }
        for bad in ["", "br0'/><disk", "a b", "x234567890123456", "a/b"] {
            assert!(bad.parse::<IfName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_deserialize_only_when_valid() {
        assert!(serde_json::from_str::<GroupName>("\"web\"").is_ok());
        assert!(serde_json::from_str::<GroupName>("\"no way\"").is_err());
        assert_eq!(
            serde_json::to_string(&"g-1-e1".parse::<SnapshotId>().unwrap()).unwrap(),
            "\"g-1-e1\""
        );
    }
}
