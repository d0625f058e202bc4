//! Time for flow records: the kernel stamps events with CLOCK_MONOTONIC, records carry wall
//! time (RFC 3339, UTC), and the compact output shows it the way `hubble observe` does.

use std::time::{SystemTime, UNIX_EPOCH};

/// Converts the kernel's monotonic timestamps to wall time through the difference between the
/// two clocks, taken once when the agent starts. A later step of the wall clock (NTP) is not
/// followed: records keep the order and spacing the kernel saw.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Unix time in nanoseconds minus CLOCK_MONOTONIC nanoseconds.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let monotonic = crate::kernel::conntrack::monotonic_now_ns();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        Clock {
            offset_ns: wall - i128::from(monotonic),
        }
    }

    #[cfg(test)]
    pub fn with_offset(offset_ns: i128) -> Clock {
        Clock { offset_ns }
    }

    /// Unix time in nanoseconds of a monotonic timestamp.
    pub fn unix_ns(&self, monotonic_ns: u64) -> i128 {
        i128::from(monotonic_ns) + self.offset_ns
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `2024-11-25T10:00:01.123456789Z` for Unix nanoseconds, as protobuf's JSON mapping of a
/// Timestamp (what `hubble observe -o json` prints) writes it.
pub fn rfc3339(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000) as i64;
    let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let of_day = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `Nov 25 10:00:01.123` from a record's RFC 3339 time (hubble's compact format); the text as
/// it is when it does not look like one.
pub fn compact(rfc3339: &str) -> String {
    let field = |range: std::ops::Range<usize>| rfc3339.get(range);
    let parsed = (|| {
        let month: usize = field(5..7)?.parse().ok()?;
        let name = MONTHS.get(month.checked_sub(1)?)?;
        let day: u8 = field(8..10)?.parse().ok()?;
        // Go's `Jan _2`: the day padded with a space, as hubble prints it.
        Some(format!(
            "{name} {day:>2} {}.{}",
            field(11..19)?,
            field(20..23).unwrap_or("000")
        ))
    })();
    parsed.unwrap_or_else(|| rfc3339.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_are_written_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        // 2024-11-25 10:00:01.123456789 UTC (a leap year, after February).
        let t = 1_732_528_801_123_456_789i128;
        assert_eq!(rfc3339(t), "2024-11-25T10:00:01.123456789Z");
        // The last second of a leap year's February 29th.
        assert_eq!(
            rfc3339(1_709_251_199_000_000_000),
            "2024-02-29T23:59:59.000000000Z"
        );
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
    }

    #[test]
    fn compact_time_is_hubbles() {
        assert_eq!(
            compact("2024-11-25T10:00:01.123456789Z"),
            "Nov 25 10:00:01.123"
        );
        assert_eq!(compact("garbage"), "garbage");
        assert_eq!(
            compact("2026-12-02T00:59:13.373151100Z"),
            "Dec  2 00:59:13.373"
        );
    }

    #[test]
    fn the_clock_adds_its_offset() {
        let clock = Clock::with_offset(1_000);
        assert_eq!(clock.unix_ns(5), 1_005);
        let now = Clock::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let converted = now.unix_ns(crate::kernel::conntrack::monotonic_now_ns());
        assert!(
            (converted - wall).abs() < 1_000_000_000,
            "{converted} vs {wall}"
        );
    }
}
