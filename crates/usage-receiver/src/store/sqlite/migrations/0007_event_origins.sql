-- What on the site made each call (`plugin:ai-alt-text`, `theme:acme`, `core`), as the
-- agent sends it; NULL for events that named none, and for every event stored before.
ALTER TABLE events ADD COLUMN origin TEXT;
