//! Ethernet addresses as written by people (`02:00:00:00:00:01`), and as the maps key them
//! ([`MacKey`]).

use std::{fmt, str::FromStr};

use enforcer_common::MacKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad MAC address {0:?}: expected six hex bytes separated by ':' (e.g. 02:00:00:00:00:01)")]
pub struct MacParseError(String);

impl MacAddr {
    pub const fn key(self) -> MacKey {
        MacKey::new(self.0)
    }

    /// Unicast and not all-zero: the only kind of address a VM can be registered under.
    pub const fn is_unicast(self) -> bool {
        self.0[0] & 1 == 0 && !matches!(self.0, [0, 0, 0, 0, 0, 0])
    }
}

impl From<MacKey> for MacAddr {
    fn from(key: MacKey) -> Self {
        Self(key.addr)
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_owned());
        let mut bytes = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        // Through `pad`, so tables can align it.
        f.pad(&format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}"))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let mac: MacAddr = "02:AB:00:00:00:0f".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0xab, 0, 0, 0, 0x0f]);
        assert_eq!(mac.to_string(), "02:ab:00:00:00:0f");
        assert_eq!("02-ab-00-00-00-0f".parse::<MacAddr>().unwrap(), mac);
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "2:0:0:0:0:1",
            "zz:00:00:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unicast_only() {
        assert!("02:00:00:00:00:01".parse::<MacAddr>().unwrap().is_unicast());
        assert!(!"ff:ff:ff:ff:ff:ff".parse::<MacAddr>().unwrap().is_unicast());
        assert!(!"01:00:5e:00:00:01".parse::<MacAddr>().unwrap().is_unicast());
        assert!(!"00:00:00:00:00:00".parse::<MacAddr>().unwrap().is_unicast());
    }
}
