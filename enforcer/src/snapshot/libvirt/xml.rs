//! Reading and editing libvirt domain XML: the first NIC, the file-backed disks a snapshot
//! captures, and the XML a restore boots from (disks on new overlays, NICs on another bridge).
//! Only the `<devices>` of the domain are read. Edits replace attribute values in place, so
//! everything else stays byte for byte (libvirt validates the result against the saved ABI).
//! Calls nothing else of the product.

use std::{ops::Range, path::PathBuf};

use roxmltree::{Document, Node};
use serde::{Deserialize, Serialize};

use crate::model::MacAddr;

/// What a domain's live XML says about its network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainNic {
    pub mac: MacAddr,
    pub bridge: Option<String>,
    /// The host-side tap (`vnetN`), when the domain runs.
    pub tap: Option<String>,
}

/// A disk image format QEMU opens a file with (`<driver type=…>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub const fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A file-backed disk of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDisk {
    /// The guest's name for it (`vda`).
    pub target: String,
    pub file: PathBuf,
    pub format: DiskFormat,
}

fn devices<'a>(doc: &'a Document<'a>) -> Result<Node<'a, 'a>, String> {
    doc.root_element()
        .children()
        .find(|n| n.has_tag_name("devices"))
        .ok_or_else(|| "the domain XML has no <devices>".to_owned())
}

fn child<'a>(node: Node<'a, 'a>, tag: &str) -> Option<Node<'a, 'a>> {
    node.children().find(|c| c.has_tag_name(tag))
}

/// The domain's name (`<domain><name>`).
pub fn domain_name(xml: &str) -> Result<String, String> {
    let doc = Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    child(doc.root_element(), "name")
        .and_then(|n| n.text())
        .map(|n| n.trim().to_owned())
        .ok_or_else(|| "the domain XML has no <name>".to_owned())
}

/// The first NIC of a domain XML.
pub fn first_nic(xml: &str) -> Result<DomainNic, String> {
    let doc = Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    let nic = devices(&doc)?
        .children()
        .find(|n| n.has_tag_name("interface"))
        .ok_or("the domain has no network interface")?;
    let child_attr =
        |tag: &str, attr: &str| child(nic, tag).and_then(|c| c.attribute(attr).map(str::to_owned));
    let mac = child_attr("mac", "address")
        .ok_or("the domain's interface has no MAC")?
        .parse()
        .map_err(|e| format!("the domain's MAC: {e}"))?;
    Ok(DomainNic {
        mac,
        bridge: child_attr("source", "bridge"),
        tap: child_attr("target", "dev"),
    })
}

/// The domain's disks. Only file-backed raw or qcow2 disks can be captured; any other disk is
/// refused rather than left out (memory restored with a disk that moved on would be
/// inconsistent), and so is a disk several domains share (one VM's capture of it would not be
/// the others'). CD-ROMs, floppies and read-only disks do not change and are not captured.
pub fn file_disks(xml: &str) -> Result<Vec<FileDisk>, String> {
    let doc = Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    let devices = devices(&doc)?;
    // Storage the guest writes that no snapshot can capture: refused, never left out (case
    // S17 of the security review: `lun` disks were skipped).
    for node in devices.children().filter(|n| n.is_element()) {
        let writable = child(node, "readonly").is_none();
        let what = match node.tag_name().name() {
            "disk" if node.attribute("device") == Some("lun") && writable => {
                Some("a `lun` disk (SCSI passthrough)")
            }
            "filesystem" if writable => Some("a writable `<filesystem>` share of the host"),
            "hostdev" if node.attribute("type") == Some("scsi") => Some("a SCSI `<hostdev>`"),
            _ => None,
        };
        if let Some(what) = what {
            return Err(format!(
                "the domain has {what}: its contents cannot be captured with the VM"
            ));
        }
    }
    let mut out = Vec::new();
    for disk in devices
        .children()
        .filter(|n| n.has_tag_name("disk") && n.attribute("device").unwrap_or("disk") == "disk")
        .filter(|n| child(*n, "readonly").is_none())
    {
        let target = child(disk, "target")
            .and_then(|t| t.attribute("dev"))
            .unwrap_or("?")
            .to_owned();
        if child(disk, "shareable").is_some() {
            return Err(format!(
                "disk {target} is shared with other domains: it cannot be captured per VM"
            ));
        }
        let kind = disk.attribute("type").unwrap_or("file");
        let source = child(disk, "source").and_then(|s| s.attribute("file"));
        let Some(file) = source.filter(|_| kind == "file") else {
            return Err(format!(
                "disk {target} is a `{kind}` disk: only file-backed disks can be captured"
            ));
        };
        let format = match child(disk, "driver").and_then(|d| d.attribute("type")) {
            Some("qcow2") => DiskFormat::Qcow2,
            Some("raw") | None => DiskFormat::Raw,
            Some(other) => {
                return Err(format!(
                    "disk {target} is `{other}`: only raw and qcow2 disks can be captured"
                ));
            }
        };
        out.push(FileDisk {
            target,
            file: PathBuf::from(file),
            format,
        });
    }
    Ok(out)
}

/// The XML a restore boots from: every file disk named in `disks` (target, new file, its
/// format) on that file, and every NIC that has a bridge or a libvirt network as its source
/// on `bridge` instead. Fails when a disk named is not in the XML (nothing is left half-moved).
pub fn for_restore(
    xml: &str,
    bridge: Option<&str>,
    disks: &[(String, PathBuf, DiskFormat)],
) -> Result<String, String> {
    let doc = Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    let devices = devices(&doc)?;
    // (byte range, replacement), applied back to front.
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let value = |node: Node, name: &str| {
        node.attribute_node(name)
            .map(|a| a.range_value())
            .ok_or_else(|| format!("<{}> has no {name}", node.tag_name().name()))
    };
    for (target, file, format) in disks {
        let disk = devices
            .children()
            .filter(|n| n.has_tag_name("disk"))
            .find(|d| child(*d, "target").and_then(|t| t.attribute("dev")) == Some(target))
            .ok_or_else(|| format!("the saved domain has no disk {target}"))?;
        let source = child(disk, "source").ok_or_else(|| format!("disk {target} has no source"))?;
        let driver = child(disk, "driver").ok_or_else(|| format!("disk {target} has no driver"))?;
        let file = file
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", file.display()))?;
        edits.push((value(source, "file")?, escape(file)));
        edits.push((value(driver, "type")?, format.name().into()));
        // The chain below the new file is read from its qcow2 header, not from this XML.
        if let Some(backing) = child(disk, "backingStore") {
            edits.push((backing.range(), String::new()));
        }
    }
    if let Some(bridge) = bridge {
        for nic in devices.children().filter(|n| n.has_tag_name("interface")) {
            let Some(source) = child(nic, "source") else {
                continue;
            };
            match nic.attribute("type") {
                Some("bridge") => edits.push((value(source, "bridge")?, escape(bridge))),
                // A libvirt network's bridge: the interface becomes a plain bridge interface.
                Some("network") => {
                    edits.push((value(nic, "type")?, "bridge".into()));
                    let attrs = source.attributes().map(|a| a.range()).fold(
                        None::<Range<usize>>,
                        |acc, r| match acc {
                            None => Some(r),
                            Some(a) => Some(a.start.min(r.start)..a.end.max(r.end)),
                        },
                    );
                    let attrs = attrs.ok_or("a network interface's source has no attributes")?;
                    edits.push((attrs, format!("bridge='{}'", escape(bridge))));
                }
                _ => {}
            }
        }
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_owned();
    for (range, text) in edits {
        out.replace_range(range, &text);
    }
    Ok(out)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain><devices>\
        <interface type='bridge'><mac address='52:54:00:77:00:11'/><source bridge='enfbr0'/>\
        <target dev='vnet3'/></interface></devices></domain>";

    #[test]
    fn reads_the_first_nic() {
        let nic = first_nic(XML).unwrap();
        assert_eq!(nic.mac.to_string(), "52:54:00:77:00:11");
        assert_eq!(nic.bridge.as_deref(), Some("enfbr0"));
        assert_eq!(nic.tap.as_deref(), Some("vnet3"));
        assert!(first_nic("<domain/>").is_err());
        // Only inside <devices>: an interface named in metadata does not count.
        let meta = "<domain><metadata><interface><mac address='52:54:00:00:00:01'/></interface>\
            </metadata><devices/></domain>";
        assert!(first_nic(meta).is_err());
    }

    #[test]
    fn storage_no_snapshot_captures_is_refused() {
        for (device, refused) in [
            (
                "<disk type='block' device='lun'><source dev='/dev/sdb'/><target dev='sda'/></disk>",
                true,
            ),
            (
                "<filesystem type='mount'><source dir='/srv'/><target dir='srv'/></filesystem>",
                true,
            ),
            (
                "<filesystem type='mount'><source dir='/srv'/><target dir='srv'/><readonly/></filesystem>",
                false,
            ),
            (
                "<hostdev mode='subsystem' type='scsi'><source/></hostdev>",
                true,
            ),
            (
                "<disk type='file' device='cdrom'><source file='/i.iso'/><target dev='hdc'/></disk>",
                false,
            ),
        ] {
            let xml = format!("<domain><devices>{device}</devices></domain>");
            assert_eq!(file_disks(&xml).is_err(), refused, "{device}");
        }
    }

    #[test]
    fn reads_the_domains_own_name() {
        let xml = "<domain><name> vm1 </name><metadata><name>other</name></metadata></domain>";
        assert_eq!(domain_name(xml).unwrap(), "vm1");
        assert!(domain_name("<domain><metadata><name>x</name></metadata></domain>").is_err());
    }

    #[test]
    fn lists_file_disks_and_refuses_what_cannot_be_captured() {
        assert_eq!(file_disks(XML).unwrap(), vec![]);
        let disks = file_disks(
            "<domain><devices><disk type='file' device='disk'><driver type='qcow2'/>\
             <source file='/d/a.qcow2'/><target dev='vda'/></disk>\
             <disk type='file' device='disk'><source file='/d/b.img'/><target dev='vdb'/></disk>\
             <disk type='file' device='cdrom'/></devices></domain>",
        )
        .unwrap();
        assert_eq!(
            disks,
            vec![
                FileDisk {
                    target: "vda".into(),
                    file: "/d/a.qcow2".into(),
                    format: DiskFormat::Qcow2
                },
                FileDisk {
                    target: "vdb".into(),
                    file: "/d/b.img".into(),
                    format: DiskFormat::Raw
                },
            ]
        );
        let refused = file_disks(
            "<domain><devices><disk type='block' device='disk'><source dev='/dev/sdb'/>\
             <target dev='vdb'/></disk></devices></domain>",
        )
        .unwrap_err();
        assert!(
            refused.contains("vdb") && refused.contains("block"),
            "{refused}"
        );
        let shared = file_disks(
            "<domain><devices><disk type='file' device='disk'><source file='/d/s.img'/>\
             <target dev='vdb'/><shareable/></disk></devices></domain>",
        )
        .unwrap_err();
        assert!(shared.contains("shared"), "{shared}");
        let readonly = "<domain><devices><disk type='file' device='disk'><source file='/d/r.img'/>\
             <target dev='vdc'/><readonly/></disk></devices></domain>";
        assert_eq!(file_disks(readonly).unwrap(), vec![]);
        let vmdk = file_disks(
            "<domain><devices><disk type='file' device='disk'><driver type='vmdk'/>\
             <source file='/d/c.vmdk'/><target dev='vdc'/></disk></devices></domain>",
        )
        .unwrap_err();
        assert!(vmdk.contains("vmdk"), "{vmdk}");
    }

    #[test]
    fn restore_xml_moves_disks_and_nics_and_nothing_else() {
        let xml = "<domain><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
            <source file='/d/a.img'/><backingStore/><target dev='vda' bus='virtio'/></disk>\
            <interface type='bridge'><mac address='52:54:00:77:00:11'/>\
            <source bridge='enfbr0'/></interface>\
            <interface type='network'><mac address='52:54:00:77:00:12'/>\
            <source network='default' portid='x'/></interface></devices></domain>";
        let out = for_restore(
            xml,
            Some("br9"),
            &[("vda".into(), "/d/a.r1.qcow2".into(), DiskFormat::Qcow2)],
        )
        .unwrap();
        assert_eq!(
            file_disks(&out).unwrap(),
            vec![FileDisk {
                target: "vda".into(),
                file: "/d/a.r1.qcow2".into(),
                format: DiskFormat::Qcow2
            }]
        );
        assert!(!out.contains("backingStore"), "{out}");
        assert_eq!(first_nic(&out).unwrap().bridge.as_deref(), Some("br9"));
        assert!(
            out.contains(
                "<interface type='bridge'><mac address='52:54:00:77:00:12'/><source bridge='br9'/>"
            ),
            "{out}"
        );
        // Without a bridge and disks nothing changes.
        assert_eq!(for_restore(xml, None, &[]).unwrap(), xml);
        let missing =
            for_restore(xml, None, &[("vdz".into(), "/x".into(), DiskFormat::Raw)]).unwrap_err();
        assert!(missing.contains("vdz"), "{missing}");
    }
}
