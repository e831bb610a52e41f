DROP TABLE plugin_quarantines;
