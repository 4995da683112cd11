//! HTTP-date as caches meet it (RFC 9110 §5.6.7): the IMF-fixdate form,
//! and the obsolete RFC 850 and asctime forms a recipient must accept.
//!
//! Names of days and months compare without case, and the weekday is read
//! but not checked against the date, as origins get both wrong more often
//! than they get the date wrong. Anything else malformed (a zone other
//! than GMT, a two-digit year in the IMF form, missing or extra
//! separators) is not a date: for `Expires` that means already expired.
//! Formatting is `httpdate`'s business.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const LONG_DAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// The time an HTTP-date names, or `None` when it is not one.
pub fn parse(s: &str) -> Option<SystemTime> {
    imf_fixdate(s).or_else(|| rfc850(s)).or_else(|| asctime(s))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`
fn imf_fixdate(s: &str) -> Option<SystemTime> {
    let (day, rest) = s.split_once(", ")?;
    one_of(day, &DAYS)?;
    let mut p = rest.split(' ');
    let (d, m, y, t, zone) = (p.next()?, p.next()?, p.next()?, p.next()?, p.next()?);
    if p.next().is_some() || d.len() != 2 || y.len() != 4 || !zone.eq_ignore_ascii_case("gmt") {
        return None;
    }
    at(number(y)?, one_of(m, &MONTHS)? + 1, number(d)?, t)
}

/// `Sunday, 06-Nov-94 08:49:37 GMT`
fn rfc850(s: &str) -> Option<SystemTime> {
    let (day, rest) = s.split_once(", ")?;
    one_of(day, &LONG_DAYS)?;
    let mut p = rest.split(' ');
    let (date, t, zone) = (p.next()?, p.next()?, p.next()?);
    if p.next().is_some() || !zone.eq_ignore_ascii_case("gmt") {
        return None;
    }
    let mut dp = date.split('-');
    let (d, m, y) = (dp.next()?, dp.next()?, dp.next()?);
    if dp.next().is_some() || d.len() != 2 || y.len() != 2 {
        return None;
    }
    // Two-digit years more than 50 years ahead are in the past century.
    let this_year = 1970 + (now_secs() / 31_556_952) as i64;
    let mut year = this_year / 100 * 100 + number(y)?;
    if year > this_year + 50 {
        year -= 100;
    }
    at(year, one_of(m, &MONTHS)? + 1, number(d)?, t)
}

/// `Sun Nov  6 08:49:37 1994`
fn asctime(s: &str) -> Option<SystemTime> {
    if s.len() != 24 {
        return None;
    }
    let b = s.as_bytes();
    if b[3] != b' ' || b[7] != b' ' || b[10] != b' ' || b[19] != b' ' {
        return None;
    }
    one_of(&s[..3], &DAYS)?;
    let month = one_of(&s[4..7], &MONTHS)? + 1;
    // Two digits, or a space and one.
    let day = s[8..10].strip_prefix(' ').unwrap_or(&s[8..10]);
    at(number(&s[20..24])?, month, number(day)?, &s[11..19])
}

fn one_of(name: &str, names: &[&str]) -> Option<i64> {
    names
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as i64)
}

fn number(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `year-month-day` at `hh:mm:ss` GMT.
fn at(year: i64, month: i64, day: i64, time: &str) -> Option<SystemTime> {
    let mut t = time.split(':');
    let (h, m, s) = (t.next()?, t.next()?, t.next()?);
    if t.next().is_some() || h.len() != 2 || m.len() != 2 || s.len() != 2 {
        return None;
    }
    let (h, m, s) = (number(h)?, number(m)?, number(s)?);
    // 60: a leap second.
    if !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 || year < 1970 {
        return None;
    }
    if day > days_in(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

fn days_in(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn now_secs() -> u64 {
    crate::clock::wall()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> Option<u64> {
        parse(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs())
    }

    #[test]
    fn the_three_forms_name_the_same_time() {
        let t = Some(784_111_777);
        assert_eq!(secs("Sun, 06 Nov 1994 08:49:37 GMT"), t);
        assert_eq!(secs("Sunday, 06-Nov-94 08:49:37 GMT"), t);
        assert_eq!(secs("Sun Nov  6 08:49:37 1994"), t);
        assert_eq!(secs("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(secs("Tue, 29 Feb 2000 12:00:00 GMT"), Some(951_825_600));
    }

    #[test]
    fn case_and_a_wrong_weekday_are_forgiven() {
        let t = Some(784_111_777);
        assert_eq!(secs("sun, 06 nov 1994 08:49:37 gmt"), t);
        assert_eq!(secs("SUN, 06 NOV 1994 08:49:37 GMT"), t);
        assert_eq!(secs("Mon, 06 Nov 1994 08:49:37 GMT"), t);
        assert!(parse("Thu Aug  8 08:49:37 2050").is_some());
    }

    #[test]
    fn malformed_dates_are_not_dates() {
        for bad in [
            "",
            "0",
            "-1",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Nov 1994 08:49:37 AEST",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sun 06 Nov 1994 08:49:37 GMT",
            "Sun,  06 Nov 1994 08:49:37 GMT",
            "Sun, 06-Nov-1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 8:49:37 GMT",
            "Sun, 06 Nov 1994 08.49.37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
            "Sun Nov 06 08:49:37 1994 GMT",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
