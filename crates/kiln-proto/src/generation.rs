//! Protocol generations. Every message type and variant names the generation that
//! introduced it; the handshake picks the lowest generation both sides speak fully.

/// Oldest generation this build still speaks.
pub const GENERATION_MIN: u16 = 1;
/// Newest generation this build speaks. Bump it (and add `schema/gen-N.txt`) whenever the
/// encoding of any message changes; the schema snapshot test enforces this.
pub const GENERATION_CURRENT: u16 = 6;

/// Picks the generation for a session: the highest one both ranges contain, which is the
/// lower of the two maxima ("lowest wins"). `None` when the ranges do not overlap.
pub fn negotiate(peer_min: u16, peer_max: u16) -> Option<u16> {
    negotiate_up_to(peer_min, peer_max, GENERATION_CURRENT)
}

/// [`negotiate`] for a side that speaks only up to `own_max` (an agent that acts as an older
/// one: how tests prove a newer host covers an older agent).
pub fn negotiate_up_to(peer_min: u16, peer_max: u16, own_max: u16) -> Option<u16> {
    let own_max = own_max.clamp(GENERATION_MIN, GENERATION_CURRENT);
    let chosen = peer_max.min(own_max);
    (chosen >= peer_min.max(GENERATION_MIN) && peer_min <= peer_max).then_some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_maximum_wins() {
        assert_eq!(
            negotiate(1, GENERATION_CURRENT + 5),
            Some(GENERATION_CURRENT)
        );
        assert_eq!(
            negotiate(GENERATION_MIN, GENERATION_MIN),
            Some(GENERATION_MIN)
        );
    }

    #[test]
    fn an_older_side_gets_its_own_generation() {
        assert_eq!(negotiate_up_to(1, GENERATION_CURRENT, 1), Some(1));
        assert_eq!(negotiate_up_to(2, GENERATION_CURRENT, 1), None);
        // A cap above what this build speaks changes nothing.
        assert_eq!(
            negotiate_up_to(1, GENERATION_CURRENT + 3, 99),
            Some(GENERATION_CURRENT)
        );
    }

    #[test]
    fn disjoint_ranges_fail() {
        assert_eq!(
            negotiate(GENERATION_CURRENT + 1, GENERATION_CURRENT + 3),
            None
        );
        assert_eq!(negotiate(3, 2), None);
        assert_eq!(negotiate(0, 0), None);
    }
}
