//go:build !race

package guesttest_test

const raceBuild = false
