-- The provider's label of an install, shown on the dashboard; NULL when none.
ALTER TABLE installs ADD COLUMN label text;
