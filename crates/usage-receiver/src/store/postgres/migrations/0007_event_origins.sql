-- What on the site made each call (`plugin:ai-alt-text`, `theme:acme`, `core`), as the
-- agent sends it; NULL for events that named none, and for every event stored before.
-- Added to the partitioned table, so every partition, made or to be made, has it.
ALTER TABLE events ADD COLUMN origin text;
