//! DLLogger's JSON-lines format (`DLLL {json}`), which NVIDIA's tooling parses.

use std::io::Write;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// UTC time as ISO 8601 (`2026-11-28T11:05:40.123456+00:00`), without a date library.
fn iso_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, micros) = (d.as_secs() as i64, d.subsec_micros());
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}+00:00",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// One `LOG` record: printed on stdout and, when given, appended to `file`.
pub fn log(
    file: Option<&Path>,
    start: Instant,
    step: serde_json::Value,
    data: serde_json::Value,
) -> Result<(), String> {
    let now = SystemTime::now();
    let record = serde_json::json!({
        "timestamp": format!("{}", now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()),
        "datetime": iso_utc(now),
        "elapsedtime": format!("{}", start.elapsed().as_secs_f64()),
        "type": "LOG",
        "step": step,
        "data": data,
    });
    let line = format!("DLLL {record}");
    println!("{line}");
    if let Some(path) = file {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        writeln!(f, "{line}").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn formats_utc_dates() {
        assert_eq!(
            super::iso_utc(UNIX_EPOCH),
            "1970-01-01T00:00:00.000000+00:00"
        );
        let t = UNIX_EPOCH + Duration::from_secs(1_795_864_840) + Duration::from_micros(5);
        assert_eq!(super::iso_utc(t), "2026-11-28T11:20:40.000005+00:00");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&super::iso_utc(leap)[..10], "2000-02-29");
    }
}
