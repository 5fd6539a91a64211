//! Names the packet-fixture tests share: XDP and TC actions, and the
//! addresses of the standard fixture network (VIPs in `VIP_RANGE4`/`6`,
//! pods, the activator `TestDataplane::new` configures, clients).

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: i32 = 0;

pub const VIP: &str = "10.96.0.10";
pub const VIP6: &str = "fd00:96::10";
pub const CLIENT: &str = "198.51.100.7";
pub const CLIENT6: &str = "2001:db8::7";
pub const POD: &str = "10.244.1.2";
pub const POD6: &str = "fd00:244::2";
pub const ACT: &str = "10.245.0.2";
pub const ACT6: &str = "fd00:245::2";
