-- The provider's label of an install (SPEC 11), shown on the dashboard; NULL when none.
ALTER TABLE installs ADD COLUMN label text;
