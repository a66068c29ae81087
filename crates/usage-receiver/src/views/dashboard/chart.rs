//! The cost chart: cost per UTC day over a period, the dearest models stacked and the rest
//! as "other", as inline SVG with labelled axes that scales to its box (a `viewBox`, no
//! fixed width), today's bar marked partial. Models without a price add nothing to it, and
//! the chart says so. An empty chart says it is empty. Pure.

use std::collections::BTreeMap;

use maud::{Markup, html};

use crate::billing::money::Micros;
use crate::billing::pricing::{ModelDayTokens, Pricing};
use crate::days::day_text;
use crate::store::DayRange;
use crate::views::dashboard::format::{amount, money};

/// How many models get a colour of their own; the others are stacked as "other".
pub const TOP_MODELS: usize = 5;

const COLOURS: [&str; TOP_MODELS] = ["#4a7fb5", "#e07b39", "#59a14f", "#b07aa1", "#d4a72c"];
const OTHER_COLOUR: &str = "#9c9c9c";

// The drawing's own units; the SVG scales to the width of its box.
const WIDTH: i64 = 800;
const HEIGHT: i64 = 260;
const LEFT: i64 = 78;
const RIGHT: i64 = 12;
const TOP: i64 = 22;
const BOTTOM: i64 = 44;

/// One stacked series: a model, or "other".
struct Series {
    name: String,
    colour: &'static str,
    /// Cost per day of the period, by day offset.
    per_day: Vec<Micros>,
}

/// What the chart draws, worked out from the usage.
struct Stacks {
    series: Vec<Series>,
    /// Models with no price on some day of the period, sorted.
    unpriced: Vec<String>,
}

fn stacks(usage: &[ModelDayTokens], pricing: &Pricing, days: DayRange) -> Stacks {
    let count = usize::try_from(days.last - days.first + 1).unwrap_or(0);
    let mut by_model: BTreeMap<&str, Vec<Micros>> = BTreeMap::new();
    let mut unpriced: Vec<String> = Vec::new();
    for day in usage {
        if day.day < days.first || day.day > days.last {
            continue;
        }
        let Some(cost) = pricing.day_cost(day) else {
            unpriced.push(day.model.clone());
            continue;
        };
        let per_day = by_model
            .entry(&day.model)
            .or_insert_with(|| vec![Micros(0); count]);
        let slot = &mut per_day[(day.day - days.first) as usize];
        *slot = Micros(slot.0.saturating_add(cost.0));
    }
    unpriced.sort();
    unpriced.dedup();
    let total = |per_day: &[Micros]| per_day.iter().map(|m| i128::from(m.0)).sum::<i128>();
    let mut models: Vec<(&str, Vec<Micros>)> = by_model
        .into_iter()
        .filter(|(_, per_day)| total(per_day) > 0)
        .collect();
    // Dearest first; equal costs in name order.
    models.sort_by(|a, b| total(&b.1).cmp(&total(&a.1)).then(a.0.cmp(b.0)));
    let mut series: Vec<Series> = Vec::new();
    let mut other: Option<Series> = None;
    for (index, (name, per_day)) in models.into_iter().enumerate() {
        // "other" only for two or more models: one model is shown by its name.
        if index < TOP_MODELS {
            series.push(Series {
                name: name.to_owned(),
                colour: COLOURS[index],
                per_day,
            });
        } else {
            let other = other.get_or_insert_with(|| Series {
                name: String::new(),
                colour: OTHER_COLOUR,
                per_day: vec![Micros(0); count],
            });
            for (sum, cost) in other.per_day.iter_mut().zip(per_day) {
                *sum = Micros(sum.0.saturating_add(cost.0));
            }
            other.name = if other.name.is_empty() {
                name.to_owned()
            } else {
                "other".to_owned()
            };
        }
    }
    series.extend(other);
    Stacks { series, unpriced }
}

/// Day `d`'s stack, bottom up: each series' top edge and height in drawing units (at least
/// one, so a small cost still shows).
fn segments(
    series: &[Series],
    d: usize,
    y_of: &dyn Fn(i64) -> i64,
) -> Vec<(i64, i64, &'static str)> {
    let mut below = 0i64;
    let mut out = Vec::new();
    for s in series {
        let cost = s.per_day[d].0;
        if cost > 0 {
            let (y0, y1) = (y_of(below), y_of(below.saturating_add(cost)));
            out.push((y1, (y1 - y0).max(1), s.colour));
            below = below.saturating_add(cost);
        }
    }
    out
}

/// A round step for `max` over about four grid lines: 1, 2 or 5 times a power of ten, in
/// micro-units, at least a cent.
fn step_for(max: i64) -> i64 {
    let raw = (max / 4).max(10_000);
    let mut magnitude: i64 = 10_000;
    while magnitude.saturating_mul(10) <= raw {
        magnitude = magnitude.saturating_mul(10);
    }
    [1, 2, 5, 10]
        .into_iter()
        .map(|m| magnitude.saturating_mul(m))
        .find(|step| *step >= raw)
        .unwrap_or(magnitude.saturating_mul(10))
}

/// `12-01`: a day on the x axis.
fn short_day(day: i64) -> String {
    day_text(day).get(5..).unwrap_or_default().to_owned()
}

/// The chart of `usage` (per model and day) over `days`, `today` marked partial.
pub fn cost_chart(
    usage: &[ModelDayTokens],
    pricing: &Pricing,
    days: DayRange,
    today: i64,
    currency: &str,
) -> Markup {
    let Stacks { series, unpriced } = stacks(usage, pricing, days);
    let count = (days.last - days.first + 1).max(1);
    let totals: Vec<i64> = (0..count as usize)
        .map(|d| {
            series
                .iter()
                .map(|s| s.per_day[d].0)
                .fold(0i64, i64::saturating_add)
        })
        .collect();
    let max = totals.iter().copied().max().unwrap_or(0);
    let unpriced_note = html! {
        @if !unpriced.is_empty() {
            p.muted.unpriced-note {
                "Not in the chart, no price on some days: " (unpriced.join(", ")) "."
            }
        }
    };
    if max <= 0 {
        return html! {
            div.chart.empty {
                p #chart-empty { "No priced usage in this period: nothing to chart." }
                (unpriced_note)
            }
        };
    }
    let step = step_for(max);
    let lines = (max + step - 1) / step;
    let top_value = step * lines;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let base = TOP + plot_h;
    // Tenths of a unit, so two years of days still fit side by side.
    let slot = plot_w * 10 / count;
    let gap = if slot >= 40 { slot / 8 } else { 0 };
    let tenths = |n: i64| format!("{}.{}", n / 10, n % 10);
    let y_of = |value: i64| -> i64 {
        i64::try_from(i128::from(value) * i128::from(plot_h) / i128::from(top_value))
            .unwrap_or(plot_h)
    };
    let label_every = (count + 6) / 7;
    let title = format!("Cost per day ({currency})");
    html! {
        div.chart {
            svg #chart xmlns="http://www.w3.org/2000/svg"
                viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } preserveAspectRatio="xMinYMin meet"
                role="img" aria-label=(title) {
                // The y axis: grid lines and amounts.
                @for line in 0..=lines {
                    @let y = base - y_of(step * line);
                    line x1=(LEFT) y1=(y) x2=(WIDTH - RIGHT) y2=(y)
                        stroke=(if line == 0 { "#888" } else { "#e4e4e4" }) {}
                    text x=(LEFT - 6) y=(y + 4) font-size="11" text-anchor="end" fill="#444" {
                        (amount(Micros(step * line).to_cents()))
                    }
                }
                text x="14" y=(TOP + plot_h / 2) font-size="12" text-anchor="middle" fill="#333"
                    transform={ "rotate(-90 14 " (TOP + plot_h / 2) ")" } { (title) }
                // The bars, one stack a day.
                @for (d, total) in totals.iter().enumerate() {
                    @let day = days.first + d as i64;
                    @let x = LEFT * 10 + d as i64 * slot + gap;
                    @let partial = day == today;
                    @if *total > 0 {
                        g.day.partial[partial] opacity=(if partial { "0.5" } else { "1" }) {
                            title {
                                (day_text(day)) @if partial { " (today, partial)" } ": "
                                (money(Micros(*total).to_cents(), currency))
                            }
                            @for (y, height, colour) in segments(&series, d, &y_of) {
                                rect x=(tenths(x)) y=(base - y)
                                    width=(tenths((slot - 2 * gap).max(1)))
                                    height=(height) fill=(colour) {}
                            }
                        }
                    }
                    @if partial {
                        // Anchored at the bar's right edge, so it never runs off the chart.
                        text x=(tenths(x + (slot - 2 * gap).max(1))) y=(TOP - 6)
                            font-size="11" text-anchor="end" fill="#444" { "today, partial" }
                    }
                    @if d as i64 % label_every == 0 || d as i64 == count - 1 {
                        text x=(tenths(x + (slot - 2 * gap).max(1) / 2)) y=(base + 15)
                            font-size="11" text-anchor="middle" fill="#444" { (short_day(day)) }
                    }
                }
                text x=(LEFT + plot_w / 2) y=(HEIGHT - 6) font-size="12" text-anchor="middle"
                    fill="#333" { "Day (UTC), " (day_text(days.first)) " to " (day_text(days.last)) }
            }
            ul.legend {
                @for s in &series {
                    li {
                        i style={ "background:" (s.colour) } {}
                        (s.name) " "
                        span.muted {
                            (money(Micros(s.per_day.iter().fold(0i64, |sum, m| sum.saturating_add(m.0))).to_cents(), currency))
                        }
                    }
                }
            }
            (unpriced_note)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::pricing::{PriceSettings, TokenCounts};

    fn pricing() -> Pricing {
        Pricing::new(PriceSettings {
            model_cost_overrides: (0..8)
                .map(|n| (format!("m{n}"), 0.001 * f64::from(n + 1)))
                .collect(),
            ..PriceSettings::default()
        })
    }

    fn usage(model: &str, day: i64, prompt: u64) -> ModelDayTokens {
        ModelDayTokens {
            model: model.into(),
            day,
            tokens: TokenCounts {
                prompt,
                ..TokenCounts::default()
            },
        }
    }

    #[test]
    fn the_dearest_models_are_stacked_and_the_rest_is_other() {
        let days = DayRange {
            first: 100,
            last: 109,
        };
        let mut rows: Vec<_> = (0..8).map(|n| usage(&format!("m{n}"), 101, 1000)).collect();
        rows.push(usage("free-model", 102, 5000));
        let svg = cost_chart(&rows, &pricing(), days, 109, "USD").into_string();
        // m7 is dearest; five models and "other" in the legend.
        assert_eq!(svg.matches("<li>").count(), TOP_MODELS + 1, "{svg}");
        assert!(svg.find("m7").unwrap() < svg.find("m3").unwrap());
        assert!(svg.contains("other"));
        assert!(svg.contains("Not in the chart, no price on some days: free-model."));
        assert!(svg.contains("today, partial"));
        assert!(svg.contains("Cost per day (USD)"));
        assert!(svg.contains("viewBox=\"0 0 800 260\""));
        assert!(!svg.contains("width=\"720\""));
    }

    #[test]
    fn an_empty_chart_says_so() {
        let days = DayRange { first: 0, last: 29 };
        let svg = cost_chart(&[], &pricing(), days, 29, "USD").into_string();
        assert!(svg.contains("No priced usage in this period"), "{svg}");
        assert!(!svg.contains("<svg"));
        let only_unpriced = [usage("free-model", 3, 10)];
        let svg = cost_chart(&only_unpriced, &pricing(), days, 29, "USD").into_string();
        assert!(svg.contains("No priced usage") && svg.contains("free-model"));
    }

    #[test]
    fn a_long_period_still_fits_the_chart() {
        let rows: Vec<_> = (0..731).map(|day| usage("m0", day, 5000)).collect();
        let svg = cost_chart(
            &rows,
            &pricing(),
            DayRange {
                first: 0,
                last: 730,
            },
            900,
            "USD",
        )
        .into_string();
        assert_eq!(svg.matches("<rect").count(), 731);
        assert!(!svg.contains("width=\"0.0\""));
        assert!(!svg.contains("today, partial"));
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(step_for(0), 10_000);
        assert_eq!(step_for(4_000_000), 1_000_000);
        assert_eq!(step_for(4_100_000), 2_000_000);
        assert_eq!(step_for(17_000_000), 5_000_000);
        assert!(step_for(i64::MAX / 2) > 0);
    }
}
